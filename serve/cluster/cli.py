"""``mriseg up`` and ``mriseg demo`` through the running stack (a plugin of serve/cli.py)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def cmd_up(args) -> int:
    """Start the local stack, print how to use it, and keep it running until Ctrl-C."""
    from serve.cluster.up import start_local_stack, stop_local_stack

    print(f"starting Ray and mriseg-serve from {args.config} (first start takes a minute) ...", flush=True)
    stack = start_local_stack(args.config, port=args.port, models=args.models, embedded_s3=not args.no_s3)
    try:
        print(f"\nmriseg-serve is up at {stack.url}   (API docs: {stack.url}/v1/docs)")
        print(f"site '{stack.site}', API key: {stack.api_key}")
        if stack.metrics_url:
            print(f"metrics: {stack.metrics_url}")
        print("\nsegment a volume:\n  " + stack.curl_line())
        if stack.s3:
            s3 = stack.s3
            print(f"\nembedded S3 (SeaweedFS) at {s3['endpoint_url']}, bucket s3://mriseg/local/ "
                  f"(AWS_ACCESS_KEY_ID={s3['access_key_id']} AWS_SECRET_ACCESS_KEY={s3['secret_access_key']}):")
            print(f"  aws --endpoint-url {s3['endpoint_url']} s3 cp scan.nii.gz s3://mriseg/local/in/scan.nii.gz")
            print("  " + stack.s3_curl_line())
        print("\nor run 'mriseg demo' in another shell. Ctrl-C stops the stack.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...")
    finally:
        stop_local_stack(stack)
    return 0


def run_demo_through_stack(stack, outdir: Path, quiet: bool = False) -> dict:
    """Segment the synthetic phantom through ``stack``'s HTTP API; the hook ``mriseg demo`` uses."""
    import json

    from serve.cli import summary_table
    from serve.cluster.client import ApiClient, segment_file
    from serve.demo import demo_volume
    from serve.volume_io import write_nifti

    outdir.mkdir(parents=True, exist_ok=True)
    vol = demo_volume()
    src = write_nifti(outdir / "phantom.nii.gz", vol.data, vol.affine)
    out = segment_file(ApiClient(stack.url, stack.api_key), src, outdir / "result")
    job = out["job"]
    stats = json.loads(out["written"]["statistics"].read_text()) if "statistics" in out["written"] else None
    meta = SimpleNamespace(unavailable=job.get("unavailable") or {}, demo=bool(job.get("demo_models")))
    out["summary"] = summary_table(stats, meta) if stats is not None else ""
    return out


def cmd_demo(args) -> int:
    """``mriseg demo``: through the stack ``mriseg up`` started, else through a temporary one."""
    from serve.cluster.up import find_running_stack, start_local_stack, stop_local_stack

    if args.in_process:
        from serve.cli import cmd_demo as in_process_demo

        return in_process_demo(args)
    outdir = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="mriseg-demo-"))
    stack, temporary = find_running_stack(), False
    ignored = _ignored_by_stack(args, running=stack is not None)
    if ignored:
        print(f"mriseg demo: ignoring {', '.join(ignored)}: the stack runs with its own settings "
              f"({'the running stack' if stack else 'deployments/local.yaml'}); add --in-process to use them",
              file=sys.stderr, flush=True)
    if stack is None:
        print("no running stack ('mriseg up'); starting a temporary one for this demo ...", flush=True)
        stack = start_local_stack(models=args.models, port=_free_port(), save_state=False)
        temporary = True
    try:
        print(f"segmenting a synthetic phantom through {stack.url} ...", flush=True)
        out = run_demo_through_stack(stack, outdir, quiet=args.quiet)
    finally:
        if temporary:
            stop_local_stack(stack)
    job = out["job"]
    print(out["summary"])
    times = ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in job["timings"].items())
    print(f"job {job['id']}: {times}")
    print("sub-models (ran in parallel): " + ", ".join(
        f"{n} {s['compute_s']:.2f}s" for n, s in sorted(job["submodels"].items())))
    if "preview" in out["written"]:
        print(f"preview: {out['written']['preview']}")
    print(f"outputs: {outdir / 'result'}")
    return 0


def _ignored_by_stack(args, running: bool) -> list[str]:
    """The options a demo through the stack cannot honour: device, threads and the model cache
    are the Serve config's, and a stack that is already running has its models loaded."""
    ignored = []
    if args.device != "auto":
        ignored.append("--device")
    if args.threads is not None:
        ignored.append("--threads")
    if running and args.models:
        ignored.append("--models")
    if args.cache_dir:  # a temporary stack caches S3 models where its config says, too
        ignored.append("--cache-dir")
    return ignored


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``up`` and send ``demo`` through the cluster."""
    from serve.cluster.up import DEFAULT_CONFIG

    p = sub.add_parser("up", help="start the local Ray Serve stack (embedded default) and keep it running")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file (default deployments/local.yaml)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    p.add_argument("--models", nargs="+", metavar="DIR_OR_S3", help="model sources (default: the demo models)")
    p.add_argument("--no-s3", action="store_true", help="do not start the embedded S3 server (uploads only)")
    p.set_defaults(func=cmd_up)

    demo = sub.choices.get("demo")
    if demo is not None:
        demo.add_argument("--in-process", action="store_true",
                          help="segment in this process instead of through the Ray Serve stack")
        demo.set_defaults(func=cmd_demo)
