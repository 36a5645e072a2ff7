#!/usr/bin/env python3
"""The machine and package versions a run saw, as one JSON object (run.sh writes it to $OUT/versions.json).
A package marked "(kit)" was imported from the wheels run.sh installed into $SITE."""

import importlib
import json
import os
import platform
import sys

SITE = os.environ.get("SITE") or None
v = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
     "cpus": os.cpu_count()}
for m in ("torch", "transformers", "accelerate", "tokenizers", "huggingface_hub", "datasets", "trl", "hydra",
          "omegaconf", "antlr4", "submitit", "dill", "multiprocess", "pyarrow", "numpy", "safetensors"):
    try:
        mod = importlib.import_module(m)
        from_kit = SITE is not None and str(getattr(mod, "__file__", "")).startswith(SITE)
        v[m] = str(getattr(mod, "__version__", "?")) + (" (kit)" if from_kit else "")
    except Exception as e:  # noqa: BLE001
        v[m] = f"MISSING ({type(e).__name__}: {e})"
try:
    import torch

    v["cuda"] = torch.version.cuda
    v["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if v["gpu"]:
        v["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as e:  # noqa: BLE001
    v["gpu"] = f"unknown ({type(e).__name__}: {e})"
print(json.dumps(v))
