#!/usr/bin/env python3
"""A minimal Python edge agent, the baseline for Spillway's throughput benchmark.

It does what edge-agent's hot path does, in the plainest way: subscribe to
spillway/<site>/<gateway>/+/data (QoS 1), parse the plain JSON form {"ts", "values"}, keep a
window per sensor, run onnxruntime on every full window from a pool of worker threads, and
publish a JSON result (QoS 1) on .../inference. One ONNX session, one intra-op thread,
shared by the workers (onnxruntime releases the GIL while it runs).

Usage: python_agent.py --port P --model FILE --window N --workers W [--site S --gateway G]
It runs until SIGTERM/SIGINT.
"""

import argparse
import json
import queue
import signal
import threading
import time

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True, help="input shape, e.g. 1,128")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--site", default="bench")
    parser.add_argument("--gateway", default="py")
    args = parser.parse_args()

    shape = [int(d) for d in args.shape.split(",")]
    window_len = int(np.prod(shape))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]

    prefix = f"spillway/{args.site}/{args.gateway}"
    jobs = queue.Queue(maxsize=4096)
    windows = {}
    next_id = [0]
    stop = threading.Event()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"py-agent-{args.gateway}")
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)

    def on_connect(c, userdata, flags, reason, properties):
        c.subscribe(f"{prefix}/+/data", qos=1)
        c.publish(f"{prefix}/status", json.dumps({"state": "online"}), qos=1, retain=True)

    def on_message(c, userdata, msg):
        sensor = msg.topic.split("/")[3]
        try:
            payload = json.loads(msg.payload)
            values = payload["values"]
            ts = payload.get("ts", time.time())
        except (ValueError, KeyError, TypeError):
            return
        buf = windows.setdefault(sensor, [])
        buf.extend(values)
        while len(buf) >= window_len:
            window = np.asarray(buf[:window_len], dtype=np.float32).reshape(shape)
            del buf[:window_len]
            next_id[0] += 1
            jobs.put((next_id[0], sensor, window, ts, time.perf_counter()))

    def work():
        while not stop.is_set():
            try:
                job_id, sensor, window, ts, created = jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            outs = session.run(output_names, {input_name: window})
            outputs = {n: o.reshape(-1).tolist() for n, o in zip(output_names, outs)}
            score = outputs["score"][0]
            result = {
                "id": job_id,
                "sensor": sensor,
                "model": "baseline",
                "version": 1,
                "where": "local",
                "ts": ts,
                "latency_us": int((time.perf_counter() - created) * 1e6),
                "score": score,
                "anomaly": False,
                "outputs": outputs,
            }
            client.publish(f"{prefix}/{sensor}/inference", json.dumps(result), qos=1)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=30)
    workers = [threading.Thread(target=work, daemon=True) for _ in range(args.workers)]
    for w in workers:
        w.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client.loop_start()
    while not stop.is_set():
        time.sleep(0.1)
    client.loop_stop()


if __name__ == "__main__":
    main()
