"""``mriseg up`` and ``mriseg demo`` through the running stack (registered by serve/cli/main.py)."""

from __future__ import annotations

import argparse
import functools
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

from serve.api.client import ApiClient, segment_file
from serve.cluster.sites import check_site_names, load_site_specs
from serve.cluster.up import DEFAULT_CONFIG, find_running_stack, start_local_stack, stop_local_stack
from serve.demo import demo_volume
from serve.errors import MrisegError
from serve.imaging.nifti import write_nifti
from serve.outputs.summary import summary_table

if TYPE_CHECKING:
    from serve.cluster.up import LocalStack


def cmd_up(args) -> int:
    """Start the local stack, print how to use it, and keep it running until Ctrl-C."""
    if args.sites and args.tenants:
        raise MrisegError("give --sites or --tenants, not both")
    sites = (load_site_specs(args.tenants) if args.tenants
             else check_site_names(args.sites.split(",")) if args.sites else None)
    print(f"starting Ray and mriseg-serve from {args.config} (first start takes a minute) ...", flush=True)
    stack = start_local_stack(args.config, port=args.port, models=args.models, embedded_s3=not args.no_s3,
                              sites=sites)
    try:
        print(banner(stack), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...")
    finally:
        stop_local_stack(stack)
    return 0


def banner(stack: "LocalStack") -> str:
    """What ``mriseg up`` prints once the stack is up.

    Args:
        stack: the running stack.

    Returns:
        The text: each site's API key, prefix and S3 keys (never the server identity's), how to segment
        a volume, and the embedded S3 ports that still answer without credentials.
    """
    lines = [f"\nmriseg-serve is up at {stack.url}   (API docs: {stack.url}/v1/docs)"]
    if stack.metrics_url:
        lines.append(f"metrics: {stack.metrics_url}")
    for site in stack.sites:
        lines.append(f"\nsite '{site.name}': API key {site.api_key}")
        if site.s3:
            lines += [f"  S3 prefix {site.prefix} (inbox {site.inbox}, results in {site.outbox}{site.name}/<case>/)",
                      f"  S3 keys for this prefix only: AWS_ACCESS_KEY_ID={site.s3['access_key_id']} "
                      f"AWS_SECRET_ACCESS_KEY={site.s3['secret_access_key']}"]
    lines.append(f"\nsegment a volume (as site '{stack.site}'):\n  " + stack.curl_line())
    if stack.s3:
        endpoint = stack.s3["endpoint_url"]
        lines += [f"\nembedded S3 (SeaweedFS) at {endpoint}; with site '{stack.site}'s S3 keys:",
                  f"  aws --endpoint-url {endpoint} s3 cp scan.nii.gz s3://mriseg/{stack.site}/in/scan.nii.gz",
                  "  " + stack.s3_curl_line()]
    if stack.open_ports:
        lines.append("\nembedded S3 ports that answer without credentials (127.0.0.1 only; no object data or keys):")
        lines += [f"  {p}" for p in stack.open_ports]
    lines.append("\nor run 'mriseg demo' in another shell. Ctrl-C stops the stack.")
    return "\n".join(lines)


def run_demo_through_stack(stack, outdir: Path, quiet: bool = False) -> dict:
    """Segment the synthetic phantom through ``stack``'s HTTP API; the hook ``mriseg demo`` uses."""
    outdir.mkdir(parents=True, exist_ok=True)
    vol = demo_volume()
    src = write_nifti(outdir / "phantom.nii.gz", vol.data, vol.affine)
    out = segment_file(ApiClient(stack.url, stack.api_key), src, outdir / "result")
    job = out["job"]
    stats = json.loads(out["written"]["statistics"].read_text()) if "statistics" in out["written"] else None
    meta = SimpleNamespace(unavailable=job.get("unavailable") or {}, demo=bool(job.get("demo_models")))
    out["summary"] = summary_table(stats, meta) if stats is not None else ""
    return out


def cmd_demo(args, in_process: Callable[[argparse.Namespace], int]) -> int:
    """``mriseg demo``: through the stack ``mriseg up`` started, else through a temporary one.

    Args:
        args: The parsed ``demo`` options.
        in_process: The handler of ``demo --in-process`` (the one :func:`register` replaced).

    Returns:
        The exit code.
    """
    if args.in_process:
        return in_process(args)
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``up`` and send ``demo`` through the cluster."""
    p = sub.add_parser("up", help="start the local Ray Serve stack (embedded default) and keep it running")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file (default deployments/local.yaml)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    p.add_argument("--models", nargs="+", metavar="DIR_OR_S3", help="model sources (default: the demo models)")
    p.add_argument("--no-s3", action="store_true", help="do not start the embedded S3 server (uploads only)")
    p.add_argument("--sites", metavar="A,B", default=None,
                   help="sites to make, each with its own API key, S3 prefix s3://mriseg/<site>/ (inbox/, outbox/) "
                        "and S3 keys limited to it (default: one site, 'local')")
    p.add_argument("--tenants", metavar="FILE", default=None,
                   help="YAML 'sites:' mapping each site name to max_concurrent_jobs/requests_per_second/burst "
                        "(keys and prefixes are made as for --sites)")
    p.set_defaults(func=cmd_up)

    demo = sub.choices.get("demo")
    if demo is not None:
        demo.add_argument("--in-process", action="store_true",
                          help="segment in this process instead of through the Ray Serve stack")
        demo.set_defaults(func=functools.partial(cmd_demo, in_process=demo.get_default("func")))
