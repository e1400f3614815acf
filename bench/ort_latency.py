#!/usr/bin/env python3
"""onnxruntime latency per zoo model, one thread: prints one JSON line per model.

Usage: ort_latency.py ZOO_DIR RUNS  (inputs are the model's reference windows)
"""

import json
import pathlib
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    zoo = pathlib.Path(sys.argv[1])
    runs = int(sys.argv[2])
    for ref_path in sorted(zoo.glob("*.reference.json")):
        ref = json.loads(ref_path.read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(zoo / ref["model"]), options, providers=["CPUExecutionProvider"])
        shape = [1] + ref["window_shape"]
        windows = [np.asarray(w, dtype=np.float32).reshape(shape) for w in ref["windows"]]
        name = session.get_inputs()[0].name
        for w in windows[:50]:
            session.run(None, {name: w})
        times = []
        for i in range(runs):
            w = windows[i % len(windows)]
            start = time.perf_counter()
            session.run(None, {name: w})
            times.append(time.perf_counter() - start)
        times.sort()
        print(json.dumps({
            "model": ref["model"].removesuffix(".onnx"),
            "median_us": times[len(times) // 2] * 1e6,
            "p99_us": times[int(len(times) * 0.99)] * 1e6,
        }))


if __name__ == "__main__":
    main()
