"""Checkpoint directories: config.json + single or sharded safetensors (hub layout).

`load_model` builds the model on `meta`, streams tensors from memory-mapped files, renames them by
the family's table, checks names and shapes, and assigns them (no second copy when dtypes match).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tilemem.config import ModelConfig
from tilemem.errors import CheckpointError, ConfigError, WeightError
from tilemem.jsonio import read_json_object
from tilemem.layers.fp8 import FP8
from tilemem.layers.fp8 import dequantize as dequantize_fp8
from tilemem.layers.ggml import GgmlMatrix
from tilemem.loader.gguf_checkpoint import GgufCheckpoint
from tilemem.loader.gguf_file import is_gguf
from tilemem.loader.safetensors_file import SafetensorsFile
from tilemem.models.registry import Family, config_from_hf, family_for_architecture
from tilemem.pages import populate

log = logging.getLogger(__name__)

DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(name: str | torch.dtype | None, default: str = "bfloat16") -> torch.dtype:
    """A torch dtype from `bf16`, `fp16`, `fp32` (or their long names)."""
    if isinstance(name, torch.dtype):
        return name
    key = (name or default).lower()
    if key not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype '{name}'; use one of bf16, fp16, fp32.")
    return DTYPE_NAMES[key]


@dataclass
class Checkpoint:
    """An opened (validated, not yet loaded) Hugging Face checkpoint directory."""

    path: Path
    hf_config: dict
    family: Family
    config: ModelConfig
    files: dict[str, SafetensorsFile] = field(default_factory=dict)
    weight_map: dict[str, str] = field(default_factory=dict)
    """Hub tensor name -> file name."""
    config_source = "config.json"
    """Where the config comes from (for messages)."""

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint | GgufCheckpoint:
        """Validate `path` as a checkpoint directory and index its tensors (a `.gguf` file: `GgufCheckpoint`)."""
        path = Path(path)
        if is_gguf(path):
            return GgufCheckpoint.open(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint path '{path}' does not exist; pass a checkpoint directory.")
        if not path.is_dir():
            raise CheckpointError(
                f"'{path}' is a file, not a checkpoint directory; pass the folder that holds config.json "
                "and *.safetensors, or a .gguf file."
            )
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(
                f"'{path}' is not a checkpoint: it has no config.json (create one with `tilemem synth`, "
                "or pass a Hugging Face model folder)."
            )
        hf = read_json_object(cfg_path, ConfigError)
        config = config_from_hf(hf, str(cfg_path))
        family = family_for_architecture(config.architecture)
        ckpt = cls(path=path, hf_config=hf, family=family, config=config)
        ckpt._index()
        ckpt._find_mtp()
        return ckpt

    def _find_mtp(self) -> None:
        """Keep the config's MTP layers only if the checkpoint stores them, and note which optional
        MTP tensors (own embedding, own LM head) it has."""
        from tilemem.models.mtp import OUR_PREFIX

        cfg = self.config
        if not cfg.num_mtp_layers:
            return
        ours = {self.to_ours(n) for n in self.weight_map}
        mtp = {n for n in ours if n.startswith(OUR_PREFIX)}
        if not mtp:  # e.g. a checkpoint converted without them: the model runs without an MTP head
            self.config = cfg.with_(num_mtp_layers=0)
            return
        self.config = cfg.with_(
            mtp_own_embed=any(n.endswith(".embed_tokens.weight") for n in mtp),
            mtp_own_head=any(n.endswith(".shared_head.head.weight") for n in mtp),
        )

    def to_ours(self, hub_name: str) -> str:
        """Our module name for a hub tensor name (family renames, then MTP layers to `mtp.layers.*`)."""
        from tilemem.models.mtp import hub_to_ours

        return hub_to_ours(self.family.to_ours(hub_name), self.config)

    def to_hub(self, our_name: str) -> str:
        """The hub tensor name for one of our module names."""
        from tilemem.models.mtp import ours_to_hub

        return self.family.to_hub(ours_to_hub(our_name, self.config))

    def _index(self) -> None:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is malformed ({exc}); it needs a 'weight_map'.") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(
                    f"{index} is malformed: its 'weight_map' must map tensor names to shard file names."
                )
            for fname in sorted(set(weight_map.values())):
                fpath = self.path / fname
                if not fpath.exists():
                    raise CheckpointError(
                        f"{index} lists shard '{fname}' but it is missing from {self.path}; re-download the checkpoint."
                    )
                self.files[fname] = SafetensorsFile(fpath)
            for name, fname in weight_map.items():
                if name not in self.files[fname].entries:
                    raise CheckpointError(f"{index} says '{name}' is in {fname}, but that shard lacks it.")
            self.weight_map = dict(weight_map)
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(
                    f"'{self.path}' has config.json but no *.safetensors weights; only safetensors "
                    "checkpoints are supported."
                )
            for fpath in shards:
                f = SafetensorsFile(fpath)
                self.files[fpath.name] = f
                for name in f.names():
                    self.weight_map[name] = fpath.name

    def tensor(self, hub_name: str) -> torch.Tensor:
        """The memory-mapped tensor stored under `hub_name`."""
        return self.files[self.weight_map[hub_name]].tensor(hub_name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(hub name, tensor) for every tensor, in file order."""
        for fname, f in self.files.items():
            for name in f.names():
                if self.weight_map.get(name) == fname:
                    yield name, f.tensor(name)

    def nbytes(self) -> int:
        """Total bytes of all weight files."""
        return sum(f.size for f in self.files.values())


FP32_BUFFERS = ("e_score_correction_bias",)


def load_model(
    path: str | Path | Checkpoint,
    dtype: str | torch.dtype | None = None,
    max_positions: int | None = None,
    skip: callable | None = None,
    device: str | torch.device = "cpu",
    lazy_x12: bool = False,
    dequantize: bool = False,
):
    """Build the model on meta and assign checkpoint weights. Returns (model, checkpoint).

    An FP8 checkpoint's quantized weights stay FP8 (one byte per weight, their block scales beside them:
    `layers.fp8`); `dtype` is then the activation dtype. With `dequantize`, they are dequantized to `dtype`
    at load instead (twice the memory or more).

    `skip(our_name) -> bool` leaves some tensors unassigned (the tiered runtime loads experts from
    the tile store instead); they stay on `meta`. With a CUDA `device`, every assigned weight is
    copied there once (tied weights stay tied) and the mapped file pages are left to the kernel.
    On the CPU the mapped weights are populated at once; with `lazy_x12`, all but those x12 will encode
    (`MoECausalLM.x12_weight_names`): they are read once, to be encoded.
    """
    from tilemem.models.model import MoECausalLM
    from tilemem.models.mtp import is_mtp_name

    ckpt = path if isinstance(path, (Checkpoint, GgufCheckpoint)) else Checkpoint.open(path)
    cfg = ckpt.config
    target = parse_dtype(dtype, cfg.torch_dtype if cfg.torch_dtype in DTYPE_NAMES else "bfloat16")
    model = MoECausalLM(cfg).requires_grad_(False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}  # our weight name -> its fp32 block scales
    quantized: dict[str, GgmlMatrix] = {}  # our weight name -> its GGUF blocks
    unexpected = []
    for hub_name, tensor in ckpt.tensors():
        if hub_name.endswith(SCALE_SUFFIX):
            weight_hub = hub_name[: -len(SCALE_SUFFIX)] + ".weight"
            ours = ckpt.to_ours(weight_hub)
            if ours not in expected:
                unexpected.append(hub_name)
            elif not (skip is not None and skip(ours) and not is_mtp_name(ours)):
                scales[ours] = tensor.float()  # fp32, bf16 or ue8m0 powers of two: exact in fp32
            continue
        ours = ckpt.to_ours(hub_name)
        if ours not in expected:
            if is_mtp_name(ours):
                raise _mtp_error(ckpt, hub_name, ours, "is not a tensor of an MTP layer")
            unexpected.append(hub_name)
            continue
        if tuple(tensor.shape) != expected[ours]:
            if is_mtp_name(ours):
                raise _mtp_error(
                    ckpt, hub_name, ours, f"has shape {list(tensor.shape)}, expected {list(expected[ours])}"
                )
            raise WeightError(
                f"tensor '{ckpt.to_hub(ours)}' in {ckpt.path} has shape {list(tensor.shape)}, but {ckpt.config_source} "
                f"implies {list(expected[ours])}; the weights do not match the config (check hidden_size, "
                "intermediate sizes and expert counts)."
            )
        if skip is not None and skip(ours) and not is_mtp_name(ours):  # MTP weights always stay resident
            continue
        if isinstance(tensor, GgmlMatrix):
            quantized[ours] = tensor
            continue
        if tensor.dtype == FP8:
            state[ours] = tensor
            continue
        want = torch.float32 if ours.endswith(FP32_BUFFERS) else target
        state[ours] = tensor if tensor.dtype == want else tensor.to(want)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise WeightError(
            f"{ckpt.path} has tensors the {cfg.architecture} model does not use: {shown}; the checkpoint "
            "does not match its config.json (wrong architecture or layer count?)."
        )
    for table in (state, quantized):
        if cfg.tie_word_embeddings and "lm_head.weight" not in table and "model.embed_tokens.weight" in table:
            table["lm_head.weight"] = table["model.embed_tokens.weight"]
    if dequantize and quantized:
        log.warning(
            "decoding the %d quantized weights of %s to %s at load (--dequantize)", len(quantized), ckpt.path, target
        )
        state.update({name: m.dequantize().to(target) for name, m in quantized.items()})
        quantized = {}
    loaded = state.keys() | quantized.keys()
    missing = [k for k in expected if k not in loaded and not (skip is not None and skip(k) and not is_mtp_name(k))]
    if missing:
        shown = ", ".join(ckpt.to_hub(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightError(
            f"{ckpt.path} is missing tensors: {shown}{more}; the checkpoint is incomplete or does not "
            "match config.json."
        )
    fp8 = fp8_scales(ckpt, state, scales)
    if dequantize and fp8:
        log.warning(
            "dequantizing the %d FP8 weights of %s to %s at load (--dequantize): %dx their memory",
            len(fp8), ckpt.path, target, target.itemsize,
        )  # fmt: skip
        for name, scale in fp8.items():
            state[name] = dequantize_fp8(state[name], scale).to(target)
        fp8 = {}
    model.load_state_dict(state, strict=False, assign=True)
    for name, scale in fp8.items():
        model.get_submodule(name.removesuffix(".weight")).weight_scale_inv = scale
    for name, m in quantized.items():
        model.get_submodule(name.removesuffix(".weight")).set_quantized(m)
    model.model.embed_tokens.out_dtype = target
    if quantized or fp8:
        model.portable_rows()
    device = torch.device(device)
    if device.type == "cpu":
        # The embedding table is a gather: only the rows used are touched (a tied lm_head is populated as lm_head).
        lazy = model.x12_weight_names() if lazy_x12 else set()
        eager = (n for n in state if not n.endswith("embed_tokens.weight") and n not in lazy)
        populate(state[n] for n in eager if state[n].device.type == "cpu")
        populate(m.data for n, m in quantized.items() if not n.endswith("embed_tokens.weight"))
    model.finish_loading(max_positions or cfg.max_position_embeddings)
    if device.type != "cpu":
        move_to(model, device)
    return model, ckpt


SCALE_SUFFIX = ".weight_scale_inv"


def fp8_scales(ckpt: Checkpoint, state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict:
    """Pair every FP8 weight of `state` with its block scales (our weight name -> fp32 scales), checking
    the config declares FP8, every FP8 weight has a scale of the declared block grid, and every scale a
    FP8 weight."""
    fp8 = {name for name, t in state.items() if t.dtype == FP8}
    where = ckpt.path
    if fp8 and ckpt.config.weight_format != "fp8_e4m3":
        name = ckpt.to_hub(sorted(fp8)[0])
        raise WeightError(
            f"tensor '{name}' in {where} is float8_e4m3fn, but config.json declares no FP8 quantization_config "
            '(quant_method "fp8", weight_block_size [128, 128]); add it as the model\'s original config has it.'
        )
    block = ckpt.config.quant_block
    out = {}
    for name in sorted(fp8):
        hub = ckpt.to_hub(name)
        if name not in scales:
            raise WeightError(
                f"FP8 weight '{hub}' in {where} has no '{hub.removesuffix('.weight')}{SCALE_SUFFIX}' (its block "
                "scales); the checkpoint is incomplete: re-download it."
            )
        rows, cols = state[name].shape
        want = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        if tuple(scales[name].shape) != want:
            raise WeightError(
                f"'{hub.removesuffix('.weight')}{SCALE_SUFFIX}' in {where} has shape {list(scales[name].shape)}, "
                f"but weight [{rows}, {cols}] in {block[0]}x{block[1]} blocks (config.json weight_block_size) "
                f"needs {list(want)}; the scales were written for another block size or another weight."
            )
        out[name] = scales[name].contiguous()
    stray = sorted(set(scales) - fp8)
    if stray:
        raise WeightError(
            f"'{ckpt.to_hub(stray[0]).removesuffix('.weight')}{SCALE_SUFFIX}' in {where} scales a weight that is "
            "not float8_e4m3fn; the checkpoint mixes quantized and dequantized tensors: re-download it."
        )
    return out


def require_device(device: str | torch.device) -> None:
    """Raise a clear error when `device` is a CUDA device and this machine has none."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device '{device}' needs a CUDA GPU and this machine has none (torch.cuda.is_available() is "
            "False); use device='cpu' and a budget without cuda."
        )


def move_to(model: torch.nn.Module, device: torch.device) -> None:
    """Copy every assigned parameter and buffer to `device` (meta ones stay: the tiered runtime owns
    them); a tensor shared by two modules (tied embeddings) is copied once."""
    require_device(device)
    moved: dict[tuple, torch.Tensor] = {}  # (address, shape, dtype, is parameter) of the original -> its copy

    def to(t: torch.Tensor) -> torch.Tensor:
        if t.is_meta or t.device.type == device.type:
            return t
        key = (t.data_ptr(), tuple(t.shape), t.dtype, isinstance(t, torch.nn.Parameter))
        if key not in moved:
            copy = t.data.to(device)
            moved[key] = torch.nn.Parameter(copy, requires_grad=False) if key[-1] else copy
        return moved[key]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = to(t)


def _mtp_error(ckpt: Checkpoint, hub_name: str, ours: str, problem: str) -> WeightError:
    """A WeightError for a misnamed or mis-shaped multi-token-prediction tensor."""
    from tilemem.models.mtp import MTP_OWN_NAMES

    cfg = ckpt.config
    layer = ours.split(".")[2]
    first = cfg.num_layers
    return WeightError(
        f"MTP tensor '{hub_name}' in {ckpt.path} {problem}. config.json declares num_nextn_predict_layers="
        f"{cfg.num_mtp_layers}, so model.layers.{first}..{first + cfg.num_mtp_layers - 1} are MTP layers (this "
        f"is MTP layer {layer}); each holds {', '.join(MTP_OWN_NAMES)}, optionally embed_tokens.weight and "
        f"shared_head.head.weight, and a decoder block shaped like model.layers.{first - 1}. Fix or remove the "
        "tensor, or set num_nextn_predict_layers to the MTP layers the checkpoint really has."
    )
