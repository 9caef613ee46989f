"""The baseline of `vectorpipe-bench laptop`: the same texts embedded with the same weights by
sentence-transformers on PyTorch, as people usually do it (`SentenceTransformer(dir).encode`,
batches of --batch, L2-normalised).

It reads the JSONL --input, takes the string at --field of every line (what the laptop pipeline's
`textPointers: ["/text"]` takes), loads the model from --model (the directory the laptop mode
uses), embeds the texts --repeat times and prints one JSON line: the texts, the load seconds, the
best encode seconds of the repeats, and the process' CPU seconds.

usage: sentence_transformers_encode.py --model DIR --input FILE [--field text] [--batch 32]
                                       [--repeat 3]
"""

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--field", default="text")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with open(args.input, encoding="utf-8") as f:
        texts = [json.loads(line)[args.field] for line in f if line.strip()]

    started = time.perf_counter()
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    load_seconds = time.perf_counter() - started

    best = None
    cpu_before = cpu_seconds()
    for _ in range(args.repeat):
        began = time.perf_counter()
        vectors = model.encode(texts, batch_size=args.batch, normalize_embeddings=True)
        took = time.perf_counter() - began
        best = took if best is None else min(best, took)
    cpu = (cpu_seconds() - cpu_before) / args.repeat
    print(
        json.dumps(
            {
                "texts": len(texts),
                "dimensions": int(vectors.shape[1]),
                "load_seconds": load_seconds,
                "encode_seconds": best,
                "cpu_seconds_per_encode": cpu,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
