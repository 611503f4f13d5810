"""Storage paths side by side: a local folder vs object storage (a local S3 API server, moto's,
started here as its own process on 127.0.0.1 unless --endpoint names one), both through
`cadist.storage.store` — the layer training, resume and the shard stream use.

- checkpoint save + load: a model's weights and its SGD momentum (what a DeepSpeed ZeRO-0
  checkpoint holds per model) written into a `step_…` folder and read back, plus the lookup of
  the newest registered checkpoint that a rerun does first;
- shard streaming: samples/s through the validation stream, raw (tar members only) and decoded.

Prints one JSON object. The machines are shared and noisy: quote the ratios, not the times.

    python bench/storage.py [--model deeplabv3_resnet_tiny] [--samples 64 --height 256 --width 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cli = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(cli), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def median_s(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_checkpoint(store, files: dict[str, Path], repeats: int, scratch: Path) -> dict:
    from cadist.storage.store import Storage

    n = [0]

    def save():
        n[0] += 1
        for name, path in files.items():
            store.upload(path, f"bench/step_{n[0]:08d}/{name}")

    def load():
        for name in files:
            store.download(f"bench/step_{n[0]:08d}/{name}", scratch / name)

    save_s = median_s(save, repeats)
    load_s = median_s(load, repeats)
    store.write_json("bench/checkpoint_manager_snapshot.json", {"checkpoint_results": [
        {"checkpoint_dir_name": f"step_{i:08d}"} for i in range(1, n[0] + 1)]})  # fmt: skip
    lookup_s = median_s(lambda: Storage(store.root).latest_checkpoint("bench"), repeats)
    return {"save_s": round(save_s, 4), "load_s": round(load_s, 4),
            "latest_lookup_s": round(lookup_s, 4)}  # fmt: skip


def bench_stream(manifest: str, passes: int) -> dict:
    from cadist.data.stream import ShardStream, expand_shards, iter_raw_samples

    urls = expand_shards(manifest)

    def raw():
        return sum(1 for u in urls for _ in iter_raw_samples(u))

    def decoded():
        return sum(len(b["key"]) for b in ShardStream(manifest, train=False, batch_size=4))

    count = raw()
    raw_s = median_s(raw, passes)
    dec_s = median_s(decoded, passes)
    return {"samples": count, "raw_samples_per_s": round(count / raw_s, 1),
            "decoded_samples_per_s": round(count / dec_s, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deeplabv3_resnet_tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--endpoint", default=None, help="An S3 endpoint to use instead of moto.")
    args = ap.parse_args()

    proc = None
    if args.endpoint is None:
        proc, endpoint = start_moto()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    else:
        endpoint = args.endpoint
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        from cadist.data.shards import build_shards
        from cadist.data.synthetic import write_tree
        from cadist.nets.build import build_model
        from cadist.storage.store import Storage

        bucket = f"cadist-bench-{os.getpid()}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = build_model(args.model, output_stride=16)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model(torch.randn(2, 3, 64, 64)).mean().backward()
            opt.step()
            files = {"model.pt": tmp / "model.pt", "optim.pt": tmp / "optim.pt"}
            torch.save(model.state_dict(), files["model.pt"])
            torch.save(opt.state_dict(), files["optim.pt"])
            mb = sum(p.stat().st_size for p in files.values()) / 2**20
            (tmp / "dl").mkdir()
            ckpt = {
                "local": bench_checkpoint(Storage(tmp / "runs"), files, args.repeats, tmp / "dl"),
                "s3": bench_checkpoint(
                    Storage(f"s3://{bucket}/runs"), files, args.repeats, tmp / "dl"
                ),  # fmt: skip
            }
            write_tree(tmp / "cs", num_train=0, num_val=args.samples, height=args.height,
                       width=args.width, seed=0)  # fmt: skip
            build_shards(tmp / "cs", "val", tmp / "shards", samples_per_shard=8, progress=False)
            build_shards(tmp / "cs", "val", f"s3://{bucket}/shards", samples_per_shard=8,
                         workers=1, progress=False)  # fmt: skip
            stream = {
                "local": bench_stream(str(tmp / "shards" / "val-manifest.json"), args.passes),
                "s3": bench_stream(f"s3://{bucket}/shards/val-manifest.json", args.passes),
            }
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    out = {
        "bench": "storage",
        "s3_server": "moto_server (local)" if proc is not None else endpoint,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "checkpoint": {"model": args.model, "mib": round(mb, 2), **ckpt},
        "stream": {"image_hw": [args.height, args.width], "format": "png", **stream},
        "ratios_s3_over_local": {
            "checkpoint_save": round(ckpt["s3"]["save_s"] / ckpt["local"]["save_s"], 2),
            "checkpoint_load": round(ckpt["s3"]["load_s"] / ckpt["local"]["load_s"], 2),
            "latest_lookup": round(
                ckpt["s3"]["latest_lookup_s"] / ckpt["local"]["latest_lookup_s"], 2
            ),
            "stream_raw_throughput": round(
                stream["s3"]["raw_samples_per_s"] / stream["local"]["raw_samples_per_s"], 3
            ),
            "stream_decoded_throughput": round(
                stream["s3"]["decoded_samples_per_s"] / stream["local"]["decoded_samples_per_s"], 3
            ),
        },  # fmt: skip
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
