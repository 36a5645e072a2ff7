"""Errors every layer raises; each message is the single line a user sees (`klrl: <message>`, exit 2)."""


class ConfigError(ValueError):
    """A bad configuration value or a refused command: one line naming the key, the bad value and what is valid."""


class AuditError(ConfigError):
    """Bad input to `klrl audit`."""
