"""How every stage loads the original model: one set of fields, mixed into each script's config.

:class:`ModelLoadingArguments` (``model_dtype``, ``attn_implementation``) is a base of
``DumpConfig``, ``LensSFTConfig``, ``LensGRPOConfig`` and ``EntropyProbeConfig``, so a dump, a
supervised run, an RL run and a probe load the model the same way. The decoder and encoder
copies take the loaded model's dtype, so ``model_dtype: bfloat16`` trains the lens in bf16
weights (on CPU too); autocast (``bf16: true`` of the training configs) is the other road,
GPU only. The field is named ``model_dtype`` rather than TRL's ``dtype`` because the dump's
``dtype`` is the storage dtype of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lens_rl.config import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def local_folder(path: str | Path, what: str = "model_name_or_path") -> Path:
    """``path`` as an existing local folder. lens_rl reads models and tokenizers from folders
    only and never downloads from the Hub, so anything else (a missing folder, a file, a Hub
    id) is an error naming it, before transformers would try the Hub.

    Raises:
        FileNotFoundError: naming ``what``, the path as given and where it was looked for.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    looked = f" (looked for {folder.resolve()})" if not folder.is_absolute() else ""
    kind = "a file, not a folder" if folder.exists() else "not an existing folder"
    raise FileNotFoundError(
        f"{what} {str(path)!r} is {kind}{looked}. lens_rl loads models and tokenizers from local "
        "folders only and makes no Hub downloads: download the model into a folder first (e.g. "
        "`huggingface-cli download ORG/NAME --local-dir models/NAME`) and pass that folder."
    )


@dataclass
class ModelLoadingArguments:
    """Model-loading fields shared by every stage (see the module docstring)."""

    model_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Dtype of the model weights (and of the lens built on them)."}
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = field(
        default=None,
        metadata={
            "help": "transformers attention kernel; default: the library's (eager for Gemma 2, whose "
            "attention soft-capping sdpa would ignore)."
        },
    )

    def check_model_loading(self) -> None:
        """Refuse a kernel that cannot run here (flash-attn missing, or without CUDA)."""
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
                raise ConfigError(
                    "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA "
                    "GPU (`EXTRAS=flash-attn make setup` on a GPU machine); use 'sdpa' or 'eager'."
                )

    def check_model_folders(self) -> None:
        """Refuse a ``model_name_or_path`` (or ``tokenizer_name_or_path``, where the config has
        one) that is not a local folder, before any loading (see :func:`local_folder`)."""
        for name in ("model_name_or_path", "tokenizer_name_or_path"):
            value = getattr(self, name, None)
            if value:
                local_folder(value, name)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``model_dtype`` as a torch dtype."""
        return DTYPES[self.model_dtype]

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~lens_rl.models.families.load_causal_lm`."""
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs
