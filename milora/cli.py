"""``milora``: initialise, convert, merge and inspect adapters from the shell."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from milora.adapter_io import factor_keys, layer_names, read_adapter, read_manifest
from milora.atomic import follow_umask
from milora.cache import DecompositionCache
from milora.chain import CHAIN_KEY, CHAIN_VS_MERGED, chain_adapters, verify_chain
from milora.config import DEFAULT_TARGETS, AdapterSpec
from milora.conversion import (
    COMPRESSED_VS_SOURCE,
    COMPRESSION_WARN_ERROR,
    compress_adapter,
    convert_adapter,
    merge_adapter,
    verify_adapter,
)
from milora.inspection import spectrum_report
from milora.layout import INITIAL_DIR
from milora.modeling import load_base_model
from milora.training import TrainConfig, run_training
from milora.training.run import read_conversations

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
# Tables stay readable when piped to a log (rich falls back to 80 columns otherwise).
console = Console() if Console().is_terminal else Console(width=150)
logger = logging.getLogger("milora")

DtypeOption = Annotated[str, typer.Option(help="weight dtype: float32, bfloat16, float16 or auto")]
RemoteCode = Annotated[bool, typer.Option(help="allow the model folder's own Python code")]


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _rank_pattern(text: str | None) -> dict[str, int]:
    """``q_proj=8,model.layers.0.mlp.down_proj=4`` as ``{key: rank}``."""
    pattern: dict[str, int] = {}
    for item in _targets(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise typer.BadParameter(
                f"{item!r}: write layer=rank, e.g. q_proj=8", param_hint="--rank-pattern"
            )
        pattern[key.strip()] = int(value)
    return pattern


RankPatternOption = Annotated[
    str | None,
    typer.Option(
        help="per-layer ranks, e.g. 'q_proj=8,model.layers.0.mlp.down_proj=4' (PEFT's rank_pattern: "
        "a module name suffix or a full layer name; alpha follows each rank unless --alpha)"
    ),
]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    # A transformers/PEFT deprecation notice on every model wrap; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
        force=True,
    )


@app.command()
def init(
    base: Annotated[Path, typer.Argument(help="Hugging Face model folder of the base model")],
    out: Annotated[Path, typer.Argument(help="adapter folder to write")],
    method: Annotated[str, typer.Option(help="milora, pissa or lora")] = "milora",
    rank: Annotated[int, typer.Option("--rank", "-r")] = 16,
    alpha: Annotated[float | None, typer.Option(help="lora_alpha; default r (2r for lora)")] = None,
    targets: Annotated[str, typer.Option(help="comma-separated module names")] = ",".join(DEFAULT_TARGETS),
    dropout: Annotated[float, typer.Option()] = 0.05,
    solver: Annotated[str, typer.Option(help="auto, gram, svd64 or svd32")] = "auto",
    rank_pattern: RankPatternOption = None,
    cache_dir: Annotated[Path | None, typer.Option(help="decomposition cache folder")] = None,
    device: Annotated[str | None, typer.Option(help="where to decompose (default: cuda if present)")] = None,
    dtype: DtypeOption = "float32",
    seed: Annotated[int, typer.Option()] = 0,
    overwrite: Annotated[bool, typer.Option()] = False,
    trust_remote_code: RemoteCode = False,
    streamed: Annotated[
        bool,
        typer.Option(
            help="read the target weights one at a time from the safetensors shards, never the "
            "whole model (milora/pissa on Linear targets; --dtype is then the checkpoint's own)"
        ),
    ] = False,
) -> None:
    """Wrap BASE in a freshly initialised adapter and save it (with its initial factors)."""
    spec = AdapterSpec(
        method, rank, alpha, _targets(targets), dropout, solver, rank_pattern=_rank_pattern(rank_pattern)
    )
    if out.exists() and not overwrite:  # before any decomposition, not after
        console.print(f"[red]error[/]: {out} exists; pass --overwrite to replace it")
        raise typer.Exit(2)
    from milora.streaming import init_to_folder

    state, _ = init_to_folder(
        base, spec, out, streamed=streamed, cache=DecompositionCache(cache_dir) if cache_dir else None,
        device=device, seed=seed, dtype=dtype, trust_remote_code=trust_remote_code, base_model=str(base),
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")):
        return  # under torchrun: rank 0 reports
    console.print(
        f"[green]{spec.method}[/] adapter r={spec.r} alpha={spec.lora_alpha:g}"
        + (f" (rank_pattern {dict(spec.rank_pattern)})" if spec.rank_pattern else "")
        + " on "
        f"{len(state.factors) or 'all'} layers -> {out} (init {state.seconds:.2f} s, "
        f"{state.cache_hits} from cache)"
    )


@app.command()
def convert(
    adapter: Annotated[Path, typer.Argument(help="trained MiLoRA/PiSSA adapter folder")],
    out: Annotated[Path, typer.Argument(help="plain LoRA adapter folder to write")],
    rank: Annotated[int | None, typer.Option(help="compress the 2r adapter to this rank")] = None,
) -> None:
    """Turn an adapter into a plain LoRA for the unmodified base (rank 2r, or --rank)."""
    if rank is None:
        convert_adapter(adapter, out)
        _, config = read_adapter(out)
        console.print(f"plain LoRA r={config['r']} for the stock base -> {out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        converted = convert_adapter(adapter, Path(tmp) / "converted")
        report = compress_adapter(converted, out, rank, source=adapter)
    console.print(
        f"plain LoRA compressed to r={rank} -> {out}; worst relative error of the update "
        f"{report.max_error:.3e}"
    )
    if report.max_error > COMPRESSION_WARN_ERROR:
        console.print(
            f"[yellow]WARNING[/]: a relative error above {COMPRESSION_WARN_ERROR:g}: the compressed adapter "
            "is a different model from the trained one; keep a higher --rank, or evaluate it before serving"
        )


@app.command()
def chain(
    adapters: Annotated[
        list[Path], typer.Argument(help="adapter folders, oldest first (each refolded onto the last)")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="plain LoRA adapter folder to write")],
    serve_rank: Annotated[
        int | None, typer.Option(help="truncate to this rank (a server's max_lora_rank)")
    ] = None,
) -> None:
    """Sum a chain of adapters into one plain LoRA for the stock base (exact, or --serve-rank)."""
    report = chain_adapters(adapters, out, serve_rank=serve_rank)
    said = f"; worst relative error of the update {report.max_error:.3e}" if report.errors else " (exact)"
    console.print(f"{len(adapters)} adapters -> plain LoRA r={report.rank} for the stock base -> {out}{said}")


# What a model folder holds beside its weights that a merged copy must keep: the tokenizer
# (fast or sentencepiece/BPE files), the chat template (transformers 5 keeps it in its own
# file), generation defaults and, for image-text-to-text models, the processor's settings.
MODEL_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)


@app.command()
def merge(
    base: Annotated[Path, typer.Argument(help="Hugging Face model folder of the stock base")],
    adapter: Annotated[Path, typer.Argument(help="adapter folder (any method, or converted)")],
    out: Annotated[Path, typer.Argument(help="folder for the merged full model")],
    dtype: DtypeOption = "float32",
    trust_remote_code: RemoteCode = False,
) -> None:
    """Fold the adapter into the base weights and save a standalone model."""
    model = load_base_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    merged = merge_adapter(model, adapter)
    merged.save_pretrained(out, safe_serialization=True)
    follow_umask(out)  # safetensors writes 0600: a serving user must be able to read it
    for name in MODEL_SIDE_FILES:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy2(base / name, out / name)
    console.print(f"merged model -> {out}")


@app.command()
def inspect(
    base: Annotated[Path, typer.Argument(help="Hugging Face model folder of the stock base")],
    adapter: Annotated[Path | None, typer.Option(help="adapter whose A rows to locate")] = None,
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="default: the adapter's r, or 16")] = None,
    targets: Annotated[str | None, typer.Option(help="comma-separated module names")] = None,
    initial: Annotated[bool, typer.Option(help="locate the initial factors instead of the trained")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON rows")] = False,
    suggest: Annotated[
        bool,
        typer.Option(
            "--suggest",
            help="suggest a rank and the target modules from the spectra (milora.suggestion); "
            "--targets limits the candidates (default: every linear layer of the blocks)",
        ),
    ] = False,
    trust_remote_code: RemoteCode = False,
) -> None:
    """Per-layer spectrum summary and which singular components an adapter occupies."""
    if suggest:
        _print_suggestion(
            load_base_model(base, trust_remote_code=trust_remote_code),
            rank or 16,
            _targets(targets) if targets else None,
            as_json,
        )
        return
    manifest = read_manifest(adapter) if adapter else None
    r = rank or (int(manifest["r"]) if manifest else 16)
    target_list = (
        _targets(targets) if targets else tuple((manifest or {}).get("target_modules", DEFAULT_TARGETS))
    )
    adapter_A = None
    if adapter is not None:
        state, _ = read_adapter(adapter / INITIAL_DIR if initial else adapter)
        adapter_A = {name: state[factor_keys(name)[0]] for name in layer_names(state)}
    model = load_base_model(base, trust_remote_code=trust_remote_code)
    rows = spectrum_report(model, target_list, r, adapter_A)
    if as_json:
        print(json.dumps([row.__dict__ for row in rows]))
        return
    table = Table(title=f"singular spectrum of {base} (r={r})")
    for column in ("layer", "shape", "σ max", "σ min", f"σ minor top-{r}", "cond"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    if adapter_A:
        table.add_column("A in minor r", justify="right")
        table.add_column("A in principal r", justify="right")
    for row in rows:
        cells = [
            row.name.removeprefix("model.").replace("layers.", "L"),
            f"{row.shape[0]}x{row.shape[1]}",
            f"{row.sigma_max:.4g}",
            f"{row.sigma_min:.4g}",
            f"{row.minor_top:.4g}",
            f"{row.condition:.3g}",
        ]
        if adapter_A:
            cells += [f"{row.minor_share:.1%}", f"{row.principal_share:.1%}"]
        table.add_row(*cells)
    console.print(table)


def _print_suggestion(model, r: int, targets: tuple[str, ...] | None, as_json: bool) -> None:
    from dataclasses import asdict

    from milora.suggestion import MAX_MINOR_ENERGY, MIN_MINOR_LEVEL, suggest_for_model

    modules, advice = suggest_for_model(model, r, targets)
    if as_json:
        print(json.dumps({"modules": [asdict(m) for m in modules], "suggestion": asdict(advice)}))
        return
    table = Table(title=f"spectrum shape per module (medians over layers; energies at r={r})")
    for column in ("module", "layers", "shape", "eff. rank", "stable rank", f"minor {r} energy",
                   f"principal {r} energy", "minor flatness", "rule's ranks"):  # fmt: skip
        table.add_column(column, justify="left" if column == "module" else "right")
    kinds: dict[str, list] = {}
    for module in modules:
        kinds.setdefault(module.kind, []).append(module)
    for kind, layers in kinds.items():

        def med(values) -> float:
            return float(statistics.median(values))

        ranks = sorted(m.suggested_rank for m in layers)
        table.add_row(
            kind,
            str(len(layers)),
            f"{layers[0].shape[0]}x{layers[0].shape[1]}",
            f"{med(m.effective_rank for m in layers):.1f}",
            f"{med(m.stable_rank for m in layers):.2f}",
            f"{med(m.minor_energy for m in layers):.3%}",
            f"{med(m.principal_energy for m in layers):.1%}",
            f"{med(m.minor_flatness for m in layers):.3f}",
            f"{ranks[0]}..{ranks[-1]}",
        )
    console.print(table)
    console.print(
        f"rule: per layer, the largest r in 2..64 (<= n/4) whose r minor components hold <= "
        f"{MAX_MINOR_ENERGY:.0%} of the energy, their median >= {MIN_MINOR_LEVEL:g} of the spectrum's median"
    )
    for kind, reason in advice.reasons.items():
        console.print(f"  {kind}: {reason}")
    if not advice.rank:
        console.print("[yellow]no module satisfies the rule[/]: keep your own rank and targets")
        return
    console.print(
        f"[green]suggested[/]: rank {advice.rank}, target_modules {list(advice.target_modules)}"
        + (f", rank_pattern for {len(advice.rank_pattern)} layers" if advice.rank_pattern else "")
    )
    # Ready to paste into params.yaml's train section (or `milora init --rank-pattern`).
    console.print(f"  rank: {advice.rank}", highlight=False)
    console.print(f"  target_modules: {json.dumps(list(advice.target_modules))}", highlight=False)
    console.print(f"  rank_pattern: {json.dumps(advice.rank_pattern)}", highlight=False, soft_wrap=True)
    if advice.rank_pattern:
        flag = ",".join(f"{k}={v}" for k, v in advice.rank_pattern.items())
        console.print(f"  (milora init/train --rank-pattern '{flag}')", highlight=False, soft_wrap=True)


@app.command()
def verify(
    base: Annotated[Path, typer.Argument(help="Hugging Face model folder of the stock base")],
    adapter: Annotated[Path, typer.Argument(help="adapter folder written by milora init or training")],
    tolerance: Annotated[float, typer.Option(help="largest relative logit difference allowed")] = 1e-4,
    max_compression_error: Annotated[
        float, typer.Option(help="a compressed adapter fails above this relative error of its update")
    ] = COMPRESSION_WARN_ERROR,
    trust_remote_code: RemoteCode = False,
) -> None:
    """Check an adapter end to end on the stock base: reload, plain-LoRA conversion, merge.

    Prints the relative logit differences; exits non-zero when conversion or merge drift
    beyond TOLERANCE. The base-vs-adapter figure is ~0 only for an untrained adapter.
    """
    report = verify_adapter(lambda: load_base_model(base, trust_remote_code=trust_remote_code), adapter)
    manifest = read_manifest(adapter) or {}
    if manifest.get(CHAIN_KEY):  # a chained adapter: against its chain merged in turn
        import torch

        load = lambda: load_base_model(base, trust_remote_code=trust_remote_code)  # noqa: E731
        ids = torch.randint(0, load().config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        report[CHAIN_VS_MERGED] = verify_chain(load, adapter, ids)
    table = Table(title=f"{adapter} on {base}")
    table.add_column("comparison")
    table.add_column("max relative logit difference", justify="right")
    for name, value in report.items():
        table.add_row(name, f"{value:.2e}")
    console.print(table)
    worst = max(
        report["adapter vs converted plain LoRA on stock base"],
        report["adapter vs merged model"],
        0.0 if "compressed_max_error" in manifest else report.get(CHAIN_VS_MERGED, 0.0),
    )
    if worst > tolerance:
        console.print(f"[red]FAILED[/]: {worst:.2e} > {tolerance:.0e}")
        raise typer.Exit(1)
    if "compressed_max_error" in manifest:
        update = float(manifest["compressed_max_error"])
        said = (
            f"compressed from r={manifest.get('compressed_from_rank')} to r={manifest.get('r')}: "
            f"relative error of the update {update:.3e}"
        )
        if COMPRESSED_VS_SOURCE in report:
            said += (
                f", of the logits {report[COMPRESSED_VS_SOURCE]:.3e} against {manifest['compressed_from']}"
            )
        if update > max_compression_error:
            console.print(f"[red]FAILED[/]: {said} > {max_compression_error:g}")
            raise typer.Exit(1)
        console.print(f"compressed: {said}")
    console.print(f"[green]OK[/]: conversion and merge agree within {tolerance:.0e}")


@app.command()
def train(
    base: Annotated[Path, typer.Argument(help="Hugging Face model folder of the base model")],
    data: Annotated[Path, typer.Argument(help="JSON lines: {'messages': [...]} or Alpaca records")],
    run_dir: Annotated[Path, typer.Argument(help="run folder: checkpoints, metrics, final adapter")],
    method: Annotated[str, typer.Option(help="milora, pissa or lora")] = "milora",
    rank: Annotated[int, typer.Option("--rank", "-r")] = 16,
    alpha: Annotated[float | None, typer.Option(help="lora_alpha; default r (2r for lora)")] = None,
    targets: Annotated[str, typer.Option(help="comma-separated module names")] = ",".join(DEFAULT_TARGETS),
    dropout: Annotated[float, typer.Option()] = 0.05,
    rank_pattern: RankPatternOption = None,
    learning_rate: Annotated[float, typer.Option("--lr")] = 3e-4,
    epochs: Annotated[float, typer.Option()] = 3.0,
    max_steps: Annotated[int, typer.Option(help="optimiser steps; -1 = from --epochs")] = -1,
    batch_size: Annotated[int, typer.Option(help="global batch per optimiser step")] = 16,
    micro_batch_size: Annotated[int, typer.Option(help="per process and forward pass")] = 4,
    warmup_steps: Annotated[int, typer.Option()] = 100,
    max_length: Annotated[int, typer.Option()] = 512,
    save_steps: Annotated[int, typer.Option()] = 200,
    logging_steps: Annotated[int, typer.Option()] = 10,
    seed: Annotated[int, typer.Option()] = 42,
    cache_dir: Annotated[Path | None, typer.Option(help="decomposition cache folder")] = None,
    restart: Annotated[bool, typer.Option(help="clear a run folder left by other data/settings")] = False,
    trust_remote_code: RemoteCode = False,
) -> None:
    """Train an adapter; rerun the same command to resume from the last checkpoint.

    Distributed: the same command under `torchrun --nproc_per_node=N -m milora.cli train ...`.
    """
    spec = AdapterSpec(
        method, rank, alpha, _targets(targets), dropout, rank_pattern=_rank_pattern(rank_pattern)
    )
    config = TrainConfig(
        learning_rate=learning_rate,
        num_epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        warmup_steps=warmup_steps,
        max_length=max_length,
        save_steps=save_steps,
        logging_steps=logging_steps,
        seed=seed,
    )
    result = run_training(
        base,
        read_conversations(data),
        run_dir,
        spec,
        config,
        cache_dir=cache_dir,
        trust_remote_code=trust_remote_code,
        restart=restart,
        image_root=Path(data).parent,  # a record's images are relative to its file
    )
    console.print(
        f"trained {result.global_step} steps ({result.examples} examples, loss {result.train_loss:.4f}) "
        f"-> {result.adapter_dir}" + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    )


@app.command()
def evaluate(
    base: Annotated[Path, typer.Argument(help="Hugging Face model folder of the base model")],
    adapter: Annotated[Path, typer.Argument(help="adapter folder (milora train's run_dir/adapter)")],
    out: Annotated[Path, typer.Argument(help="results folder (replaced as a whole)")],
    params: Annotated[Path, typer.Option(help="params.yaml whose evaluate.suites to run")] = Path(
        "params.yaml"
    ),
    suite: Annotated[list[str] | None, typer.Option(help="run only these suites (repeatable)")] = None,
    merged: Annotated[bool, typer.Option(help="evaluate merged weights instead of base + adapter")] = False,
    batch_size: Annotated[int | None, typer.Option(help="default: evaluate.batch_size")] = None,
    trust_remote_code: RemoteCode = False,
) -> None:
    """Score the base and base + adapter on the suites of params.yaml; print the comparison."""
    from milora.evaluation.runner import evaluate_adapter
    from milora.settings import load_settings

    settings = load_settings(params)
    cfg = settings.evaluation
    suites = cfg.suites
    if suite:
        unknown = sorted(set(suite) - set(suites))
        if unknown:
            raise typer.BadParameter(f"unknown suite(s) {unknown}; {params} defines {sorted(suites)}")
        suites = {name: suites[name] for name in suite}
    _, rows = evaluate_adapter(
        base,
        adapter,
        suites,
        settings.root,
        out,
        batch_size=batch_size or cfg.batch_size,
        cache_dir=settings.path(cfg.cache_dir) if cfg.cache_dir else None,
        merged=merged,
        trust_remote_code=trust_remote_code,
    )
    table = Table(title=f"{adapter} vs {base}")
    for column in ("suite", "metric", "n", "base", "adapter", "change", "forgetting"):
        table.add_column(column, justify="left" if column in ("suite", "metric") else "right")
    for row in rows:
        table.add_row(
            row.suite,
            row.metric,
            str(row.n),
            "" if row.base is None else f"{row.base:.4f}",
            f"{row.adapter:.4f}",
            "" if row.change is None else f"{row.change:+.4f}",
            "" if row.forgetting is None else f"{row.forgetting:.4f}",
        )
    console.print(table)
    console.print(f"results: {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
