"""Host memory per rank per training token, and preprocessing time, of ``dsft.data.build_datasets``
and of streaming (``dsft.data_stream``) on a generated ~100 MB JSONL (the shipped
``instruct.jsonl`` repeated, written to a temporary directory), on 1 and 2 CPU ranks.

Each rank imports, joins the process group (``dsft.dist.init``, gloo) and loads the shipped
Llama-2 tokenizer, reads ``/proc/self/status`` (the baseline), times ``build_datasets``, and reads
it again. ``bytes/token`` is the rank's RssAnon delta (its private heap: what every rank pays on
its own) over the training tokens; RssFile (file-backed pages, e.g. a memory-mapped Arrow cache,
shared between the ranks of a node through the page cache) is reported beside it. Each world size
runs twice with one tokenized cache directory: the first run builds the cache (on local rank 0,
the others wait), the second reuses it. A third run streams (``data.streaming``,
dsft/data_stream.py, ``--shuffle-buffer`` examples): each rank serves its positions of one pass
(as many positions as the cache has examples, micro-batches of 8) from the stream, and its
peak RssAnon delta over that (sampled every step) is the streaming figure; it does not grow
with the data, so compare the MiB column at two ``--mb`` sizes.

    .venv/bin/python bench/data_memory.py                  # 100 MB, worlds 1 and 2
    .venv/bin/python bench/data_memory.py --mb 10 --worlds 1 --shuffle-buffer 1000
Threads: OMP_NUM_THREADS=1 per rank; tokenization workers follow ``data.num_proc``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rank_main(data_path: str, cache_dir: str, out: str, stream_positions: str,
              shuffle_buffer: str) -> None:
    from transformers import AutoTokenizer

    from dsft import data, data_stream, dist
    from dsft.recipe import DataConfig

    dist.init()
    tokenizer = AutoTokenizer.from_pretrained(REPO / "dsft" / "assets" / "tokenizer")
    cfg = DataConfig(train=data_path, eval_fraction=0.0, max_length=512, truncate=True,
                     cache_dir=cache_dir, shuffle_buffer=int(shuffle_buffer))
    anon0, file0 = status_kib("RssAnon"), status_kib("RssFile")
    start = time.perf_counter()
    if int(stream_positions):  # this rank's positions of one pass, served and dropped
        served = data_stream.StreamedExamples(lambda: data_stream.stream(cfg, tokenizer, 0), 8)
        steps = data_stream.StreamSteps(8, 1, dist.world_size())
        tokens = examples = anon1 = file1 = 0
        for step in range(-(-int(stream_positions) // steps.global_batch)):
            for micro in steps.micro_batches(step, dist.rank()):
                tokens += sum(len(served[p]["input_ids"]) for p in micro)
                examples += len(micro)
            # the peak over the pass (sampled every step), not the value after it
            anon1, file1 = max(anon1, status_kib("RssAnon")), max(file1, status_kib("RssFile"))
    else:
        train, _, _ = data.build_datasets(cfg, tokenizer, seed=0)
        anon1, file1 = status_kib("RssAnon"), status_kib("RssFile")
        tokens = sum(len(train[i]["input_ids"]) for i in range(len(train)))
        examples = len(train)
    seconds = time.perf_counter() - start
    dist.barrier()
    report = {"rank": dist.rank(), "seconds": seconds, "examples": examples, "tokens": tokens,
              "anon_delta_bytes": (anon1 - anon0) * 1024,
              "file_delta_bytes": (file1 - file0) * 1024}
    Path(out, f"rank{dist.rank()}.json").write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, data_path: Path, cache_dir: Path, stream_positions: int,
              shuffle_buffer: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        port = str(free_port())
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--rank-main", str(data_path), str(cache_dir), out,
             str(stream_positions), str(shuffle_buffer)],
            env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                 "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                 "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                 "TOKENIZERS_PARALLELISM": "false"}) for rank in range(world)]
        if any(proc.wait() for proc in procs):
            raise SystemExit("a rank failed")
        return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--shuffle-buffer", type=int, default=10000)
    parser.add_argument("--rank-main", nargs=5)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(*args.rank_main)
        return
    shipped = (REPO / "dsft" / "assets" / "data" / "instruct.jsonl").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp, "big.jsonl")
        copies = max(1, round(args.mb * 2**20 / len(shipped)))
        data_path.write_bytes(shipped * copies)
        print(f"data: {data_path.stat().st_size / 2**20:.1f} MiB ({copies} copies of "
              "instruct.jsonl)")
        print("| ranks | run | preprocessing / streaming s (max over ranks) | examples | "
              "training tokens | RssAnon delta MiB (max rank) | RssAnon delta / token (max "
              "rank) | RssFile delta / token (max rank) |")
        print("|---|---|---|---|---|---|---|---|")
        for world in (int(w) for w in args.worlds.split(",")):
            cache_dir = Path(tmp, f"cache{world}")
            examples = 0
            for run in ("build", "reuse", "stream"):
                reports = run_world(world, data_path, cache_dir,
                                    examples if run == "stream" else 0, args.shuffle_buffer)
                examples = reports[0]["examples"]
                # the cache: every rank sees every example; the stream: each its own share
                tokens = sum(r["tokens"] for r in reports) if run == "stream" else \
                    reports[0]["tokens"]
                anon = max(r["anon_delta_bytes"] for r in reports)
                print(f"| {world} | {run} | {max(r['seconds'] for r in reports):.1f} | "
                      f"{sum(r['examples'] for r in reports) if run == 'stream' else examples} "
                      f"| {tokens} | {anon / 2**20:.1f} | {anon / tokens:.2f} | "
                      f"{max(r['file_delta_bytes'] for r in reports) / tokens:.2f} |", flush=True)


if __name__ == "__main__":
    main()
