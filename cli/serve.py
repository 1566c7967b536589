"""``trellis-export triton-repo`` / ``serve`` / ``stream``: serve a model with NVIDIA Triton Inference
Server and stream from it (docs/serving.md)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import click

_pos = click.IntRange(min=1)


@click.command("triton-repo")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Repository directory to write.")
@click.option("--name", default="trellis", show_default=True,
              help="Model name (GPU copies: NAME_onnx, NAME_trt).")
@click.option("--instances", type=_pos, default=1, show_default=True,
              help="Model instances (instance_group count).")
@click.option("--max-sequences", type=_pos, default=64, show_default=True,
              help="Sequences open at once per instance (oldest.max_candidate_sequences; the "
              "pool's capacity).")
@click.option("--max-batch-size", type=_pos, default=8, show_default=True,
              help="Requests of different sequences batched into one model call.")
@click.option("--idle-seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="A sequence without a request for this long expires (Triton forgets it after twice that).")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=0, show_default=True,
              help="oldest.max_queue_delay_microseconds: wait this long to fill a batch.")
@click.option("--ort-threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0: its default).")
@click.option("--gpu-configs/--no-gpu-configs", default=True, show_default=True,
              help="Also write the onnxruntime_onnx and tensorrt_plan models with implicit state.")
@click.option("--force", is_flag=True, help="Replace a directory that trellis-export did not write.")
def triton_repo(model: str, out: str, name: str, instances: int, max_sequences: int, max_batch_size: int,
                idle_seconds: float, queue_delay_us: int, ort_threads: int, gpu_configs: bool,
                force: bool) -> None:
    """Write a Triton model repository for MODEL.onnx (every config checked against the graph)."""
    from trellis_export.serving.repo import RepoOptions, write_repository

    opts = RepoOptions(name=name, instances=instances, max_sequences=max_sequences,
                       max_batch_size=max_batch_size, idle_seconds=idle_seconds,
                       queue_delay_us=queue_delay_us, ort_threads=ort_threads, gpu=gpu_configs)
    manifest = write_repository(model, out, opts, force=force)
    click.echo(f"wrote        {out}")
    for mname, kind in manifest["models"].items():
        click.echo(f"  {mname:<12} {kind}")
    click.echo(f"fingerprint  {manifest['fingerprint']}")
    click.echo("configs      parsed with model_config_pb2 and checked against the graph: ok")
    click.echo(f"next         trellis-export serve {out}")


@click.command()
@click.argument("repo", required=False, type=click.Path(file_okay=False, path_type=str))
@click.option("--setup", is_flag=True, help="Make the serving environment (idempotent) and exit.")
@click.option("--force", is_flag=True, help="With --setup: remake it from scratch.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="0: a free port.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="0: a free port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True,
              help="0: a free port.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=str),
              help="Server log file [default: a file in $TMPDIR, printed].")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for the model to be ready.")
def serve(repo: str | None, setup: bool, force: bool, grpc_port: int, http_port: int, metrics_port: int,
          log_path: str | None, timeout: float) -> None:
    """Run the real tritonserver on 127.0.0.1 for REPO, in the foreground (Ctrl-C stops it).

    `serve --setup` first makes the serving environment (see docs/serving.md for where it lives).
    """
    from trellis_export.serving.env import serving_home
    from trellis_export.serving.env import setup as do_setup

    if setup:
        do_setup(force=force, echo=lambda m: click.echo(m))
        if repo is None:
            return
    if repo is None:
        raise click.UsageError("give the repository directory (or --setup)")
    from trellis_export.serving.server import ServerError, TritonServer

    server = TritonServer(repo, grpc_port=grpc_port or None, http_port=http_port or None,
                          metrics_port=metrics_port or None, log=log_path)
    stop = threading.Event()
    got: list[int] = []

    def _on_signal(signum: int, _frame: object) -> None:
        got.append(signum)
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"starting tritonserver (home {serving_home()}; log {server.log_path}) ...", err=True)
        t0 = time.monotonic()
        server.start(timeout=timeout)
        click.echo(f"model {server.model} ready in {time.monotonic() - t0:.1f} s: grpc {server.grpc_url}  "
                   f"http http://{server.http_url}  metrics http://127.0.0.1:{server.metrics_port}/metrics")
        click.echo(f"stream from it: trellis-export stream --url {server.grpc_url} \"The baker \"", err=True)
        sys.stdout.flush()
        while not stop.wait(0.5):
            if server.proc is None or server.proc.poll() is not None:
                rc = server.proc.returncode if server.proc is not None else None
                raise ServerError(f"tritonserver exited by itself (code {rc}): {server.log_error()} "
                                  f"(log {server.log_path})")
        click.echo(f"signal {got[0] if got else '?'}: stopping tritonserver ...", err=True)
    finally:
        rc = server.stop()
        for s, h in old.items():
            signal.signal(s, h)
    click.echo(f"tritonserver stopped (exit code {rc})", err=True)


@click.command()
@click.argument("prompt")
@click.option("--url", default="localhost:8001", show_default=True, help="The server's gRPC address.")
@click.option("--model", default="trellis", show_default=True)
@click.option("-n", "--tokens", type=_pos, default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy; otherwise sampled.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the sampler.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds per request.")
@click.option("--ids", "as_ids", is_flag=True, help="Print token ids rather than characters.")
@click.option("--json", "as_json", is_flag=True, help="Print the latency summary as JSON.")
def stream(prompt: str, url: str, model: str, tokens: int, temperature: float, top_k: int, seed: int | None,
           timeout: float, as_ids: bool, as_json: bool) -> None:
    """Send PROMPT as one START request, then decode N tokens one request each (END on the last);
    print the tokens as they come and the latency summary."""
    from trellis_export.serving.client import StreamClient, StreamError

    with StreamClient(url, model, timeout=timeout) as client:
        vocab = client.vocab_size()
        ids = client.encode(prompt)
        if max(ids) >= vocab:
            raise StreamError(f"the prompt has characters outside the model's vocabulary ({vocab} ids)")
        if not as_ids:
            click.echo(prompt, nl=False)
        for tok in client.generate(ids, tokens, temperature=temperature, top_k=top_k, seed=seed):
            click.echo(f" {tok}" if as_ids else client.decode([tok]), nl=False)
            sys.stdout.flush()
        click.echo("")
        summary = client.latencies.summary()
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        s = summary
        click.echo(f"prefill {len(ids)} tokens: {s['prefill_ms']:.2f} ms; decode {s['decode_requests']} "
                   f"requests: p50 {s.get('decode_p50_ms', 0):.2f} ms, "
                   f"p99 {s.get('decode_p99_ms', 0):.2f} ms, "
                   f"{s.get('decode_tokens_per_s', 0):.0f} tokens/s", err=True)
