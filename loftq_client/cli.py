"""``loftq-jobs``: submit and follow LoftQ conversion jobs on a jobs API server.

    loftq-jobs submit s3://models/llama-3-8b/ --rank 16 --target q_proj --target v_proj --wait
    loftq-jobs submit s3://models/llama-3-8b/ --distributed --wait        # shards over several workers
    loftq-jobs submit s3://models/llama-3-8b/ --calibration-data s3://datasets/calib.txt \
        --objective activation --evaluate --calib-samples 128 --wait
    loftq-jobs submit s3://models/llama-3-8b/ --calibration-data s3://datasets/calib.txt \
        --objective activation --refine block --refine-steps 200 --wait
    loftq-jobs status JOB_ID
    loftq-jobs list --state running
    loftq-jobs logs JOB_ID --follow
    loftq-jobs download JOB_ID ./out
    loftq-jobs submit s3://models/llama-3-8b/ --webhook-url https://hooks.example.com/loftq \
        --webhook-event job.succeeded --webhook-event job.failed   # the signing secret is printed once
    loftq-jobs webhooks JOB_ID
    loftq-jobs delete JOB_ID --wait

API errors print ``error [code] message`` on stderr and exit with status 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from loftq_client.client import ApiError, ChecksumMismatch, LoftQClient, LoftQClientError, UnsafeArtifactPath
from loftq_client.models import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS, Evaluation, Event, Job, Refinement, WebhookDelivery

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_ERROR = 2  # API, network or checksum error
EXIT_JOB_FAILED = 1  # submit --wait: the job ended failed or cancelled

app = typer.Typer(
    name="loftq-jobs",
    add_completion=False,
    no_args_is_help=True,
    help="Submit and follow LoftQ conversion jobs on a jobs API server.",
)
out = Console(highlight=False)


def make_client(url: str, api_key: str | None) -> LoftQClient:
    """The one place the CLI builds its client (tests monkeypatch this)."""
    return LoftQClient(url, api_key)


@dataclass
class _Settings:
    url: str
    api_key: str | None


@app.callback()
def _main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", envvar="LOFTQ_URL", help="Base URL of the jobs API.")] = DEFAULT_URL,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LOFTQ_API_KEY", help="Bearer API key.")] = None,
) -> None:
    ctx.obj = _Settings(url=url, api_key=api_key or None)


def _fail(code: str, message: str) -> typer.Exit:
    typer.echo(f"error [{code}] {message}", err=True)
    return typer.Exit(EXIT_ERROR)


@contextmanager
def _client(ctx: typer.Context) -> Iterator[LoftQClient]:
    settings = ctx.find_object(_Settings) or _Settings(DEFAULT_URL, None)
    try:
        with make_client(settings.url, settings.api_key) as client:
            yield client
    except ApiError as exc:
        raise _fail(exc.code, exc.message) from None
    except ChecksumMismatch as exc:
        raise _fail("checksum_mismatch", str(exc)) from None
    except UnsafeArtifactPath as exc:
        raise _fail("unsafe_artifact_path", str(exc)) from None
    except TimeoutError as exc:
        raise _fail("timeout", str(exc)) from None
    except FileNotFoundError as exc:
        raise _fail("not_found", str(exc)) from None
    except LoftQClientError as exc:
        raise _fail("client_error", str(exc)) from None
    except httpx.HTTPError as exc:
        raise _fail("connection_error", f"{settings.url}: {exc}") from None


def _parse_meta(items: list[str] | None) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _fail("invalid_metadata", f"--meta expects KEY=VALUE, got {item!r}")
        metadata[key.strip()] = value
    return metadata


def _fmt_time(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _fmt_layers(job: Job) -> str:
    p = job.progress
    return f"{p.layers_done}/{p.layers_total}" if p.layers_total else "-"


def _num(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _evaluation_rows(e: Evaluation) -> list[tuple[str, str]]:
    """Held-out numbers of full precision → plain quantization → LoftQ-initialised model."""
    rows = [("evaluation", f"{e.sequences} held-out sequences, {e.tokens} tokens")]
    if e.perplexity_full_precision is not None or e.perplexity_initialised is not None:
        rows.append((
            "  perplexity",
            f"full precision {_num(e.perplexity_full_precision)}, quantized {_num(e.perplexity_quantized)}, "
            f"initialised {_num(e.perplexity_initialised)}",
        ))
    rows.append(("  cosine to fp", f"quantized {_num(e.cosine_quantized, '.6f')}, initialised {_num(e.cosine_initialised, '.6f')}"))
    if e.gap_recovered is not None:
        rows.append(("  gap recovered", f"{e.gap_recovered:.1%}"))
    return rows


def _refinement_rows(r: Refinement) -> list[tuple[str, str]]:
    """Blocks that kept their refined adapters and the mean held-out gain; the model stage's held-out loss."""
    text = r.mode
    if r.blocks_total:
        text += f": {r.blocks_accepted}/{r.blocks_total} blocks accepted"
        if r.mean_block_gain is not None:
            text += f", mean held-out gain {r.mean_block_gain:.1%}"
    if r.seconds is not None:
        text += f", {r.seconds:.1f} s"
    rows = [("refinement", text)]
    if r.model is not None:
        m = r.model
        rows.append((
            "  model stage",
            f"held-out {m.loss} {_num(m.heldout_before)} → {_num(m.heldout_after)}, {'accepted' if m.accepted else 'rejected'}, {m.steps} steps",
        ))
    return rows


def _fmt_event(event: Event) -> str:
    return f"{_fmt_time(event.time)} {event.type} {json.dumps(event.data, sort_keys=True, default=str)}"


def _print_whole(table: Table) -> None:
    """Print a table on ``out``, widened past the terminal when its unbreakable cells (ids) would
    not fit: rich would otherwise cut them short, and a cut id is useless."""
    needed = Measurement.get(out, out.options.update_width(1 << 14), table)
    if needed.minimum <= out.width:
        out.print(table)
        return
    # Wider than the terminal anyway: leave the wrapping columns (errors) some room too.
    Console(highlight=False, width=min(needed.maximum, needed.minimum + 30)).print(table)


def _fmt_last(delivery: WebhookDelivery) -> tuple[str, str]:
    return ("-" if delivery.last_status is None else str(delivery.last_status)), delivery.last_error or "-"


@app.command()
def submit(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="s3://bucket/prefix/, file:///path or hf://org/name (optionally @revision).")],
    output: Annotated[Optional[str], typer.Option(help="Artifact prefix (server default: jobs/<id>/).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="LoRA rank r.")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="lora_alpha (server default: r).")] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", "-t", help="LoftQ alternating iterations T.")] = None,
    quant: Annotated[Optional[str], typer.Option(help="nf4, fp4, int8, int, nf2, nf3.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Bits per weight (implied by nf4/fp4/int8/nf2/nf3).")] = None,
    svd: Annotated[Optional[str], typer.Option(help="Low-rank solver: randomized or exact.")] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="Module name or suffix to target (repeatable).")] = None,
    backbone_format: Annotated[Optional[str], typer.Option("--backbone-format", help="dequantized or bnb-4bit.")] = None,
    calibration_data: Annotated[
        Optional[str],
        typer.Option("--calibration-data", help="Calibration text: s3://bucket/key.txt, s3://bucket/prefix/ or file:///path (.txt/.jsonl)."),
    ] = None,
    objective: Annotated[
        Optional[str], typer.Option(help="weight (plain LoftQ), activation or activation-diag (need --calibration-data).")
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="Measure held-out perplexity / similarity (needs --calibration-data).")
    ] = False,
    calib_samples: Annotated[Optional[int], typer.Option("--calib-samples", help="Calibration sequences.")] = None,
    calib_seq_len: Annotated[Optional[int], typer.Option("--calib-seq-len", help="Tokens per calibration sequence.")] = None,
    eval_samples: Annotated[Optional[int], typer.Option("--eval-samples", help="Held-out sequences for --evaluate.")] = None,
    propagation: Annotated[
        Optional[str], typer.Option(help="What each block is calibrated on: initialised or full-precision.")
    ] = None,
    refine: Annotated[
        Optional[str], typer.Option(help="Refine the adapters on the calibration text: none, block, model or block+model (needs --calibration-data).")
    ] = None,
    refine_steps: Annotated[Optional[int], typer.Option("--refine-steps", help="Block refinement: Adam steps per block.")] = None,
    refine_lr: Annotated[Optional[float], typer.Option("--refine-lr", help="Block refinement: relative learning rate.")] = None,
    refine_batch_size: Annotated[Optional[int], typer.Option("--refine-batch-size", help="Block refinement: sequences per step.")] = None,
    refine_holdout: Annotated[
        Optional[float], typer.Option("--refine-holdout", help="Block refinement: share of the calibration sequences held out of the steps.")
    ] = None,
    refine_target: Annotated[
        Optional[str], typer.Option("--refine-target", help="Block refinement: match the full-precision block (block) or model (model).")
    ] = None,
    model_refine_steps: Annotated[Optional[int], typer.Option("--model-refine-steps", help="Model refinement: Adam steps.")] = None,
    model_refine_lr: Annotated[Optional[float], typer.Option("--model-refine-lr", help="Model refinement: learning rate.")] = None,
    model_refine_batch_size: Annotated[
        Optional[int], typer.Option("--model-refine-batch-size", help="Model refinement: sequences per step.")
    ] = None,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="Spread the shards over several workers, then merge (not with calibration).")
    ] = False,
    shards_per_part: Annotated[
        Optional[int], typer.Option("--shards-per-part", help="With --distributed: weight shards per worker task (default 1).")
    ] = None,
    meta: Annotated[Optional[list[str]], typer.Option("--meta", help="KEY=VALUE kept with the job (repeatable).")] = None,
    webhook_url: Annotated[
        Optional[str],
        typer.Option("--webhook-url", help="POST the job's events here (http(s)://), signed as Standard Webhooks specifies."),
    ] = None,
    webhook_event: Annotated[
        Optional[list[str]],
        typer.Option(
            "--webhook-event",
            help=f"Event to send to --webhook-url (repeatable): {', '.join(WEBHOOK_EVENTS)}. "
            "Default: every change of state, not job.progress.",
        ),
    ] = None,
    idempotency_key: Annotated[Optional[str], typer.Option("--idempotency-key", help="Resubmitting with the same key returns the same job.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to finish, with a progress bar on stderr.")] = False,
    poll_interval: Annotated[float, typer.Option("--poll-interval", help="Seconds between polls with --wait.")] = 2.0,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Give up waiting after this many seconds.")] = None,
) -> None:
    """Submit a conversion job and print its id (stdout). With --wait, exit 1 unless it succeeds."""
    metadata = _parse_meta(meta)
    targets: str | list[str] | None = None
    if target:
        targets = target[0] if len(target) == 1 and target[0] == "all-linear" else list(target)
    with _client(ctx) as client:
        job = client.create_job(
            source,
            output=output,
            metadata=metadata,
            idempotency_key=idempotency_key,
            quant=quant,
            bits=bits,
            rank=rank,
            lora_alpha=alpha,
            iters=iters,
            svd=svd,
            target_modules=targets,
            backbone_format=backbone_format,
            calibration_data=calibration_data,
            distributed=distributed,
            shards_per_part=shards_per_part,
            webhook_url=webhook_url,
            webhook_events=webhook_event or None,
            objective=objective,
            calibration={
                "samples": calib_samples,
                "seq_len": calib_seq_len,
                "eval_samples": eval_samples,
                "propagation": propagation,
                "evaluate": True if evaluate else None,
            },
            refine=refine,
            refinement={
                "steps": refine_steps,
                "lr": refine_lr,
                "batch_size": refine_batch_size,
                "holdout": refine_holdout,
                "target": refine_target,
                "model_steps": model_refine_steps,
                "model_lr": model_refine_lr,
                "model_batch_size": model_refine_batch_size,
            },
        )
        typer.echo(job.id)
        if job.webhook_secret:
            typer.echo(f"webhook secret: {job.webhook_secret}", err=True)
            typer.echo(
                "This secret is shown only once: keep it to verify the webhook-signature header of each "
                "delivery (Standard Webhooks).",
                err=True,
            )
        elif webhook_url:
            typer.echo(
                "No webhook secret in this answer: it is shown only once, when the job is created "
                "(a replayed --idempotency-key returns the job without it).",
                err=True,
            )
        if not wait:
            return
        job = client.wait(job.id, poll_interval=poll_interval, timeout=timeout, progress=True)
    typer.echo(f"{job.id} {job.state}", err=True)
    if job.state != "succeeded":
        if job.error is not None:
            typer.echo(f"error [{job.error.code}] {job.error.message}", err=True)
        raise typer.Exit(EXIT_JOB_FAILED)


@app.command()
def status(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
) -> None:
    """Show one job."""
    with _client(ctx) as client:
        job = client.get_job(job_id)
    if as_json:
        typer.echo(job.model_dump_json(indent=2))
        return
    p = job.progress
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("id", job.id),
        ("state", job.state),
        ("stage", p.stage),
        ("layers", _fmt_layers(job)),
        *([("blocks", f"{p.blocks_done}/{p.blocks_total}")] if p.blocks_total else []),
        ("shards", f"{p.shards_done}/{p.shards_total}" if p.shards_total else "-"),
        ("read / written", f"{_fmt_bytes(p.bytes_read)} / {_fmt_bytes(p.bytes_written)}"),
    ]
    if p.eta_seconds is not None and not job.finished:
        rows.append(("eta", f"{p.eta_seconds:.0f} s"))
    rows += [
        ("created", _fmt_time(job.created_at)),
        ("started", _fmt_time(job.started_at)),
        ("finished", _fmt_time(job.finished_at)),
        ("attempts", str(job.attempts)),
        ("tenant", job.tenant),
    ]
    if job.request is not None:
        rows.append(("source", job.request.source))
        if job.request.calibration_data:
            rows.append(("calibration data", job.request.calibration_data))
        if job.request.options:
            rows.append(("options", json.dumps(job.request.options, sort_keys=True, default=str)))
        if job.request.metadata:
            rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in job.request.metadata.items())))
        if job.request.webhook_url:
            events = job.request.webhook_events_filter or DEFAULT_WEBHOOK_EVENTS
            rows.append(("webhook", f"{job.request.webhook_url} ({', '.join(events)})"))
    rows.append(("output", job.output or "-"))
    if job.summary is not None:
        s = job.summary
        rows.append(
            ("summary", f"{s.layers} layers, mean error {s.mean_error:.4g} (quant only {s.mean_error_quant:.4g}), {s.seconds:.1f} s")
        )
        if s.objective != "weight" and s.mean_objective_error is not None and s.mean_objective_error_quant is not None:
            rows.append(
                ("objective", f"{s.objective}: mean error {s.mean_objective_error:.4g} (quant only {s.mean_objective_error_quant:.4g})")
            )
        if s.calibration is not None:
            c = s.calibration
            rows.append(("calibration", f"{c.sequences} sequences × {c.seq_len} tokens from {c.documents} documents, sha256 {c.sha256[:12]}"))
        if s.evaluation is not None:
            rows += _evaluation_rows(s.evaluation)
        if s.refinement is not None:
            rows += _refinement_rows(s.refinement)
    if job.error is not None:
        rows.append(("error", f"[{job.error.code}] {job.error.message}"))
    for key, value in rows:
        table.add_row(key, escape(value))
    out.print(table)


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[Optional[str], typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many jobs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the jobs as a JSON array.")] = False,
) -> None:
    """List jobs (newest first)."""
    with _client(ctx) as client:
        jobs = list(islice(client.iter_jobs(state=state, page_size=min(limit, 100)), limit))
    if as_json:
        typer.echo(json.dumps([job.model_dump(mode="json") for job in jobs], indent=2))
        return
    table = Table()
    table.add_column("ID", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("STAGE", no_wrap=True)
    table.add_column("LAYERS", no_wrap=True, justify="right")
    table.add_column("CREATED", no_wrap=True)
    table.add_column("SOURCE", overflow="fold")
    for job in jobs:
        table.add_row(
            escape(job.id),
            escape(job.state),
            escape(job.progress.stage),
            _fmt_layers(job),
            _fmt_time(job.created_at),
            escape(job.request.source if job.request else "-"),
        )
    out.print(table)


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")],
) -> None:
    """Ask the server to cancel a job; prints the id and its new state."""
    with _client(ctx) as client:
        job = client.cancel_job(job_id)
    typer.echo(f"{job.id} {job.state}")


@app.command()
def delete(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="If the job was running, wait until its worker has stopped and it is removed.")
    ] = False,
    poll_interval: Annotated[float, typer.Option("--poll-interval", help="Seconds between polls with --wait.")] = 2.0,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="With --wait: give up after this many seconds.")] = None,
) -> None:
    """Delete a job with its artifacts and events. A running job is cancelled first and removed
    once its worker stops (with --wait, this waits for that)."""
    with _client(ctx) as client:
        job = client.delete_job(job_id)
        if job is None:
            typer.echo(f"{job_id} deleted")
            return
        if not wait:
            typer.echo(f"{job.id} {job.state}; it is removed once its worker stops")
            return
        typer.echo(f"{job.id} {job.state}; it is removed once its worker stops; waiting…", err=True)
        try:
            client.wait_deleted(job_id, poll_interval=poll_interval, timeout=timeout)
        except TimeoutError as exc:
            raise _fail(
                "timeout", f"{exc}. Check later with `loftq-jobs status {job_id}` (job_not_found once it is removed)."
            ) from None
    typer.echo(f"{job_id} deleted")


@app.command()
def webhooks(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the deliveries as a JSON array.")] = False,
) -> None:
    """List a job's webhook deliveries (its own webhook and its tenant's), oldest first."""
    with _client(ctx) as client:
        deliveries = client.webhook_deliveries(job_id)
    if as_json:
        typer.echo(json.dumps([d.model_dump(mode="json") for d in deliveries], indent=2))
        return
    if not deliveries:
        typer.echo(f"{job_id}: no webhook deliveries", err=True)
        return
    table = Table()
    table.add_column("ID", no_wrap=True)
    table.add_column("EVENT", no_wrap=True)
    table.add_column("TARGET", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("ATTEMPTS", no_wrap=True, justify="right")
    table.add_column("HTTP", no_wrap=True, justify="right")
    table.add_column("LAST ERROR", overflow="fold")
    for d in deliveries:
        status, error = _fmt_last(d)
        table.add_row(escape(d.id), escape(d.event), escape(d.target), escape(d.state), str(d.attempts), status, escape(error))
    _print_whole(table)


@app.command()
def logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming (SSE) until the job finishes.")] = False,
    after: Annotated[Optional[str], typer.Option(help="Only events after this event id.")] = None,
) -> None:
    """Print a job's events, one per line: time, type, data (JSON)."""
    with _client(ctx) as client:
        events = client.stream_events(job_id, after=after) if follow else client.iter_events(job_id, after=after)
        for event in events:
            typer.echo(_fmt_event(event))


@app.command()
def upload(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Model directory (or folder of calibration text) to upload.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the upload as JSON.")] = False,
) -> None:
    """Upload a directory into your own area of the service's storage; prints the upload's
    source (upload://ID) to give to `submit` (as SOURCE, or --calibration-data)."""
    with _client(ctx) as client:
        uploaded = client.upload_model(
            directory, on_file=lambda path, size: typer.echo(f"uploading {path} ({_fmt_bytes(size)})", err=True)
        )
    if json_output:
        typer.echo(uploaded.model_dump_json(exclude={"files"}))
    else:
        typer.echo(uploaded.source)
    typer.echo(f"{len(uploaded.files)} files, {_fmt_bytes(uploaded.size)}: submit with `loftq-jobs submit {uploaded.source}`", err=True)


@app.command()
def download(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id (must have succeeded).")],
    dest: Annotated[str, typer.Argument(metavar="DEST", help="Directory to write the artifacts to.")],
) -> None:
    """Download a succeeded job's artifacts, checking size and sha256; prints each path."""
    with _client(ctx) as client:
        paths = client.download(job_id, dest)
    for path in paths:
        typer.echo(str(path))
    typer.echo(f"{len(paths)} files in {dest}", err=True)


def main() -> None:
    app(prog_name="loftq-jobs")


if __name__ == "__main__":
    main()
