"""The enumerable policies the audit works on: tabular logits, or a tiny transformer behind the same interface.

What `klrl.core.toy` and the audit need from a policy: `logits(seqs) -> [B, T, V]` (raw; the sampling distribution is
made from them by the trainer's `klrl.core.distributions`), `all_sequences() -> ([N, T] ids, [N, T] mask)`, `vocab`,
`length`, `eos`, and one parameter tensor `theta` (toy.flat_grad differentiates with respect to `policy.theta`).
The transformer adapter therefore keeps all the network's weights as one flat vector and runs the network
functionally on views of it.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from klrl.core.toy import TabularPolicy, enumerate_sequences


class TransformerPolicy(nn.Module):
    """pi(y_t | prompt, y_<t) from a transformers causal LM over the same V tokens, responses of length T."""

    def __init__(self, net: nn.Module, theta: Tensor, prompt: Tensor, length: int, eos: int | None = None):
        super().__init__()
        # Bypass module registration: the network's own parameters must not show up in self.parameters().
        object.__setattr__(self, "net", net)
        self.vocab, self.length, self.eos = net.config.vocab_size, length, eos
        self.register_buffer("prompt", prompt.long(), persistent=False)
        self.theta = nn.Parameter(theta.detach().clone())
        self._shapes = [(n, p.shape) for n, p in net.named_parameters()]
        self._cache: tuple | None = None

    @staticmethod
    def flat_weights(net: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def with_theta(self, theta: Tensor) -> "TransformerPolicy":
        return TransformerPolicy(self.net, theta, self.prompt, self.length, self.eos)

    def _weights(self) -> dict[str, Tensor]:
        out, i = {}, 0
        for name, shape in self._shapes:
            n = shape.numel()
            out[name] = self.theta[i : i + n].view(shape)
            i += n
        return out

    def logits(self, seqs: Tensor) -> Tensor:
        code = (seqs * self.vocab ** torch.arange(self.length - 1, -1, -1)).sum(-1)
        return self._table()[code]

    def _table(self) -> Tensor:
        """[V**T, T, V] logits of every response, indexed by its base-V code.

        The toy enumerates every G-tuple, so the same few responses recur thousands of times: run each once, and
        when no gradient is wanted (pi_ref, pi_old, sampling weights) reuse the result until theta changes."""
        # Under torch.func (or while theta is being differentiated) theta is not this module's own parameter.
        if not isinstance(self.theta, nn.Parameter) or (torch.is_grad_enabled() and self.theta.requires_grad):
            return self._forward_all()
        key = (self.theta.data_ptr(), self.theta._version)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._forward_all())
        return self._cache[1]

    def _forward_all(self) -> Tensor:
        seqs = torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)))  # every code
        ids = torch.cat([self.prompt.expand(len(seqs), -1), seqs[:, :-1]], -1)
        out = functional_call(self.net, self._weights(), (ids,), {"use_cache": False}).logits
        return out[:, self.prompt.numel() - 1 :]

    def all_sequences(self) -> tuple[Tensor, Tensor]:
        return enumerate_sequences(self.vocab, self.length, self.eos)


@dataclass
class Triple:
    """pi_ref, the policy pi being differentiated, and pi_old (the sampler in the off-policy table)."""

    ref: nn.Module
    policy: nn.Module
    old: nn.Module


def _noise(like: Tensor, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype)


def tabular_triple(vocab: int, length: int, distance: float, off_distance: float, seed: int = 0,
                   eos: int | None = None) -> Triple:
    """pi_ref: standard-normal logits per prefix; pi = pi_ref + distance * N(0, 1) per logit; pi_old = pi +
    off_distance * N(0, 1). Per-token KLs then stay about the same at every T, so sequence KL grows with T."""
    ref = TabularPolicy(vocab, length, seed=seed, eos=eos)
    policy, old = TabularPolicy(vocab, length, seed=seed, eos=eos), TabularPolicy(vocab, length, seed=seed, eos=eos)
    with torch.no_grad():
        policy.theta.add_(distance * _noise(policy.theta, seed + 1))
        old.theta.copy_(policy.theta + off_distance * _noise(old.theta, seed + 2))
    return Triple(ref.requires_grad_(False), policy, old.requires_grad_(False))


def tiny_llama(vocab: int, length: int, seed: int = 0, init: float = 0.5):
    """A one-layer LlamaForCausalLM over `vocab` tokens, in float64 so that exact identities show to ~1e-12.

    `init` (std of the weights) is large on purpose: at the usual 0.02 every next-token distribution is uniform
    and all KL gradients vanish. Attention stays on sdpa: the eager path takes its softmax in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=length + 2, initializer_range=init, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    net = LlamaForCausalLM(cfg).double().eval().requires_grad_(False)
    for mod in net.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = types.MethodType(_rms_norm_float64, mod)
    return net


def _rms_norm_float64(self, x: Tensor) -> Tensor:
    # transformers' RMSNorm casts to float32 whatever the input dtype, in the forward and so in the backward pass:
    # that alone caps every gradient the audit compares at ~1e-7 relative precision.
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


WEIGHT_STEP = 0.1  # weight noise per unit of distance: --distance 0.5 then gives a KL near the tabular default's


def transformer_triple(vocab: int, length: int, distance: float, off_distance: float, seed: int = 0,
                       eos: int | None = None) -> Triple:
    """The same construction in weight space: pi = pi_ref's weights + 0.1 * distance * N(0, 1), and so on.

    The prompt is a single fixed token (0); every response to it is enumerated."""
    net = tiny_llama(vocab, length, seed)
    w = TransformerPolicy.flat_weights(net)
    ref = TransformerPolicy(net, w, torch.zeros(1), length, eos)
    w_pi = w + distance * WEIGHT_STEP * _noise(w, seed + 1)
    policy = ref.with_theta(w_pi)
    old = ref.with_theta(w_pi + off_distance * WEIGHT_STEP * _noise(w, seed + 2))
    return Triple(ref.requires_grad_(False), policy, old.requires_grad_(False))


TRIPLES = {"tabular": tabular_triple, "transformer": transformer_triple}
