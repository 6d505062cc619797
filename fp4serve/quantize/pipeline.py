"""`fp4serve quantize SRC OUT`: a 16-bit checkpoint -> NVFP4 (compressed-tensors or ModelOpt layout),
layer by layer: read one decoder layer's tensors, run the calibration activations through it,
quantize, write its shard, free it. Memory is about one layer plus the activations, whatever the
model's size. The output is staged beside OUT and renamed into place only when complete."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from fp4serve.errors import ConfigError
from fp4serve.formats.checkpoint import COMPRESSED_TENSORS, MODELOPT
from fp4serve.formats.safetensors_file import read_header, write_tensors
from fp4serve.formats.safetensors_io import INDEX_NAME
from fp4serve.layers.linear import Linear
from fp4serve.quantize.awq import AWQ_ALGORITHMS
from fp4serve.quantize.calibration_data import BUNDLED, calibration_samples, read_records
from fp4serve.quantize.export_layout import kv_scale_tensors, prefix_pattern, quantization_configs
from fp4serve.quantize.layer_calibration import LayerStats, bind_caches, run_layer
from fp4serve.quantize.layer_quantizer import quantize_layer
from fp4serve.quantize.recipes import Recipe
from fp4serve.quantize.source_model import SourceModel
from fp4serve.toolkit.checkpoint_dir import HF_QUANT_NAME, index_for, staged_rewrite

ALGORITHMS = ("max", *AWQ_ALGORITHMS)
KV_CACHE = ("fp8", "nvfp4")


@dataclass
class QuantizeOptions:
    recipe: Recipe = field(default_factory=lambda: Recipe("regular"))
    fmt: str = COMPRESSED_TENSORS
    algorithm: str = "max"
    w4a4: bool = False
    kv_cache: str | None = None
    calib_data: str | None = None
    num_samples: int = 16
    seq_len: int = 512
    mtp_from: str | None = None
    strip_vision: bool = False

    def check(self) -> None:
        if self.fmt not in (COMPRESSED_TENSORS, MODELOPT):
            raise ConfigError(f"--format {self.fmt!r}: choose compressed-tensors or modelopt")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"--algorithm {self.algorithm!r}: choose from {', '.join(ALGORITHMS)}")
        if self.kv_cache not in (None, *KV_CACHE):
            raise ConfigError(f"--kv-cache {self.kv_cache!r}: choose fp8 or nvfp4")

    @property
    def needs_activations(self) -> bool:
        return self.algorithm != "max" or self.w4a4 or self.kv_cache is not None


@dataclass
class QuantizeReport:
    out: Path
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    changes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        size = sum(f.stat().st_size for f in self.out.iterdir() if f.is_file())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
        calibration = f"{self.samples} samples, {self.tokens} tokens" if self.samples else "none (max, weight-only)"
        head = (
            f"wrote {self.out}: {len(self.quantized)} Linear modules NVFP4, {len(self.kept)} decoder-layer Linears "
            f"kept 16-bit; calibration: {calibration}"
        )
        return [head, *self.changes, f"output size {size / 2**20:.1f} MiB; peak RSS {peak:.0f} MiB"]


def input_amax_fallback(stats: LayerStats) -> None:
    """A Linear no calibration token reached (an MoE expert never routed to) takes the largest input
    amax among the layer's Linears of the same kind, so its W4A4 input scale is sane."""
    kinds: dict[str, float] = {}
    for linear, record in stats.inputs.items():
        kind = linear.prefix.rpartition(".")[2]
        kinds[kind] = max(kinds.get(kind, 0.0), record.amax)
    for linear, record in stats.inputs.items():
        if record.amax == 0:
            record.amax = kinds[linear.prefix.rpartition(".")[2]] or 1.0


def kv_scales(source: SourceModel, layer, stats: LayerStats, fmt: str, kv: str) -> dict[str, torch.Tensor]:
    out = {}
    for module, (k_amax, v_amax) in stats.kv_amax.items():
        attention = next(m for m in layer.modules() if getattr(m, "attn", None) is module)
        owner = next(lin for lin in attention.modules() if isinstance(lin, Linear)).prefix.rpartition(".")[0]
        out.update(kv_scale_tensors(fmt, source.source_name(owner), k_amax, v_amax, kv))
    return out


def quantize_checkpoint(src: str | Path, out: str | Path, options: QuantizeOptions, progress: bool = True):
    from transformers import AutoTokenizer

    options.check()
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new output directory")
    source = SourceModel(src)
    report = QuantizeReport(out.resolve())
    hidden: list[torch.Tensor] = []
    samples: list[list[int]] = []
    if options.needs_activations:
        tokenizer = AutoTokenizer.from_pretrained(str(source.ckpt.path))
        records = read_records(options.calib_data) if options.calib_data else BUNDLED
        samples = calibration_samples(tokenizer, records, options.num_samples, options.seq_len)
        report.samples, report.tokens = len(samples), sum(map(len, samples))
        name = source.embedding_name()
        embedding = source.read([name])[name].float()
        hidden = [F.embedding(torch.tensor(ids), embedding) for ids in samples]
        del embedding
    num_shards = source.num_layers + 1
    with staged_rewrite(source.ckpt.path, out) as stage:
        for item in source.ckpt.path.iterdir():
            if item.suffix == ".safetensors" or item.name in (INDEX_NAME, HF_QUANT_NAME):
                stage.remove(item.name)
        headers = {}
        for index in tqdm(range(source.num_layers), desc="quantize", unit="layer", disable=not progress):
            raw = source.read(source.layer_tensors[index])
            layer = source.build_layer(index, raw)
            stats = LayerStats({}, {})
            if options.needs_activations:
                bind_caches(layer, max(map(len, samples)))
                hidden, stats = run_layer(layer, hidden, samples, keep_rows=options.algorithm in AWQ_ALGORITHMS)
                input_amax_fallback(stats)
            result = quantize_layer(source, index, layer, raw, stats, options.recipe, options.fmt,
                                    options.algorithm, options.w4a4)  # fmt: skip
            if options.kv_cache:
                result.tensors.update(kv_scales(source, layer, stats, options.fmt, options.kv_cache))
            file = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
            save_file(result.tensors, str(stage.file(file)), metadata={"format": "pt"})
            headers[file] = read_header(stage.file(file))
            report.quantized += result.quantized
            report.kept += result.kept
            del raw, layer, result, stats
        rest = f"model-{num_shards:05d}-of-{num_shards:05d}.safetensors"
        headers[rest] = write_tensors(stage.file(rest), [source.ckpt.source(n) for n in source.other_tensors])
        stage.write_json(INDEX_NAME, index_for(headers, None))
        config = source.ckpt.config()
        ignore = ignore_list(source, report.kept, options.fmt)
        config["quantization_config"], hf_quant = quantization_configs(
            options.fmt, ignore, options.w4a4, options.kv_cache, pre_quant_scale=False
        )
        stage.write_json("config.json", config)
        if hf_quant is not None:
            stage.write_json(HF_QUANT_NAME, hf_quant)
        # The surgery commands, on the staged directory: a failure leaves no OUT at all.
        if options.mtp_from:
            from fp4serve.toolkit.graft_mtp import graft_mtp

            report.changes += graft_mtp(stage.dir, options.mtp_from, force=True).lines()
        if options.strip_vision:
            from fp4serve.toolkit.strip_vision import strip_vision

            report.changes += strip_vision(stage.dir).lines()
    return report


def ignore_list(source: SourceModel, kept: list[str], fmt: str) -> list[str]:
    """Every Linear kept 16-bit, by exact name; the MTP head and the vision tower by prefix."""
    names = set(source.ckpt.where)
    entries = sorted(kept)
    if "lm_head.weight" in names:
        entries.insert(0, "lm_head")
    for prefix in ("mtp.", "model.visual.", "model.language_model.visual."):
        if any(n.startswith(prefix) for n in names):
            entries.append(prefix_pattern(fmt, prefix))
    return entries
