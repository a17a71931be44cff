"""A vLLM worker extension: load the trainer's weights into a running vLLM server, refusing bad pushes.

Start the server with ``--worker-extension-cls opd.vllm_worker.WeightPush`` (and
``VLLM_SERVER_DEV_MODE=1``, which opens ``/collective_rpc``); vLLM adds this class to its worker's
bases, so ``self`` below is the worker (``self.model_runner``, ``self.vllm_config``). opd then calls

    POST /collective_rpc {"method": "opd_load_weights", "kwargs": {"path": DIR}}

with a directory of ``*.safetensors`` holding the weights under Hugging Face names (written to
``/dev/shm`` on the same host). Every name and shape is checked against the checkpoint the server
was started from *before* anything is loaded: a load that fails half-way leaves vLLM's layer-wise
reload with layers on the meta device and the engine dead, with no rollback. The load itself goes
through ``model_runner.reload_weights``, which re-runs vLLM's post-loading repacking (on CPU the
linear weights are repacked, so a bare ``model.load_weights`` would write into emptied parameters).
"""

from __future__ import annotations

import os
from typing import Any


class WeightPush:
    """Methods added to every vLLM worker; called through ``collective_rpc``."""

    def _opd_served_shapes(self) -> dict[str, tuple[int, ...]]:
        cached = getattr(self, "_opd_shapes", None)
        if cached is None:
            from safetensors import safe_open

            root = self.vllm_config.model_config.model  # type: ignore[attr-defined]
            cached = {}
            for file in sorted(os.listdir(root)):
                if file.endswith(".safetensors"):
                    with safe_open(os.path.join(root, file), framework="pt") as handle:
                        for name in handle.keys():
                            cached[name] = tuple(handle.get_slice(name).get_shape())
            if not cached:
                raise RuntimeError(f"no *.safetensors in {root}: the server cannot check pushed weights")
            self._opd_shapes = cached
        return cached

    def opd_load_weights(self, path: str) -> dict[str, Any]:
        """Check, then load every tensor of the ``*.safetensors`` files in ``path``."""
        from safetensors import safe_open

        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        served = self._opd_served_shapes()
        tied = bool(getattr(self.vllm_config.model_config.hf_text_config,  # type: ignore[attr-defined]
                            "tie_word_embeddings", False))
        seen, problems = set(), []
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    seen.add(name)
                    shape = tuple(handle.get_slice(name).get_shape())
                    if name not in served:
                        if not (tied and name == "lm_head.weight"):  # tied models' HF state dicts carry it
                            problems.append(f"unexpected tensor {name}")
                    elif shape != served[name]:
                        problems.append(f"{name}: shape {shape}, the server's {served[name]}")
        missing = sorted(set(served) - seen)
        if missing:
            problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if problems:
            raise ValueError("weight push refused, nothing loaded: " + "; ".join(problems[:4]))

        def weights() -> Any:
            for file in files:
                with safe_open(file, framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)  # type: ignore
        return {"tensors": len(seen)}
