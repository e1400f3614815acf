#!/usr/bin/env python3
"""Train and export Spillway's sample models, with onnxruntime reference outputs.

Two models, both trained on synthetic gearbox vibration with injected bearing faults:

* ``vibration-ae``: an MLP autoencoder over one 128-sample window (128-32-8-32-128, tanh),
  trained on healthy windows only. Its output ``score`` is the mean squared reconstruction
  error, so faults (impulse trains exciting a structural resonance) score high.
* ``bearing-cnn``: a heavier fault classifier over a 1024-sample window (~4 MFLOPs): a 1-D
  convolution with a bank of 32 Gabor band-pass filters, band energies (square, global average
  pool, log), then a trained MLP head and a softmax over {healthy, outer race, inner race,
  imbalance}. Its output ``score`` is 1 - P(healthy).

Each model is written as ``<name>.onnx`` beside this script, with ``<name>.reference.json``
holding probe windows and the outputs onnxruntime computed for them (the Rust tests compare
tract against these), and ``<name>.meta.json`` holding the input shape and anomaly threshold.

Run: ``pip install -r requirements.txt && python3 train.py`` (deterministic for its seed).
"""

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier, MLPRegressor

HERE = pathlib.Path(__file__).resolve().parent
FS = 12_800.0  # sample rate, Hz
OPSET = 13
SEED = 20261128

# Signal scale baked into the models: raw accelerometer units are divided by this.
INPUT_SCALE = 4.0


def vibration(rng, n, kind):
    """One window of n samples of synthetic gearbox vibration of the given kind."""
    t = np.arange(n) / FS
    shaft = rng.uniform(20.0, 40.0)  # shaft rotation frequency, Hz
    phase = rng.uniform(0, 2 * np.pi, size=4)
    x = 0.0
    # Shaft harmonics and a gear-mesh tone (27 teeth).
    x = x + rng.uniform(0.6, 1.0) * np.sin(2 * np.pi * shaft * t + phase[0])
    x = x + rng.uniform(0.2, 0.4) * np.sin(2 * np.pi * 2 * shaft * t + phase[1])
    x = x + rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * 27 * shaft * t + phase[2])
    x = x + rng.normal(0.0, 0.08, size=n)
    if kind == "imbalance":
        x = x + rng.uniform(1.0, 1.8) * np.sin(2 * np.pi * shaft * t + phase[3])
    elif kind in ("outer", "inner"):
        # Bearing defect: impulses at the defect frequency ring a resonance near 3 kHz.
        ratio = 3.58 if kind == "outer" else 5.42
        f_defect = ratio * shaft * rng.uniform(0.97, 1.03)
        resonance = rng.uniform(2600.0, 3400.0)
        period = int(FS / f_defect)
        offset = rng.integers(0, period)
        ring_t = np.arange(min(n, 160)) / FS
        ring = np.exp(-ring_t * 900.0) * np.sin(2 * np.pi * resonance * ring_t)
        impulses = np.zeros(n)
        impulses[offset::period] = rng.uniform(2.5, 4.0)
        if kind == "inner":
            # Inner-race faults are modulated by the shaft rotation.
            impulses *= 0.6 + 0.4 * np.cos(2 * np.pi * shaft * t)
        x = x + np.convolve(impulses, ring)[:n]
    return x.astype(np.float32)


def dataset(rng, n, count, kinds):
    labels = rng.integers(0, len(kinds), size=count)
    xs = np.stack([vibration(rng, n, kinds[k]) for k in labels])
    return xs, labels


def write_model(name, graph, meta, probes):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="spillway-zoo",
        producer_version="1",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = HERE / f"{name}.onnx"
    onnx.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, {input_name: probes})
    reference = {
        "model": f"{name}.onnx",
        "input": input_name,
        "window_shape": list(probes.shape[1:]),
        "windows": [[float(v) for v in w.reshape(-1)] for w in probes],
        "outputs": {
            n: [[float(v) for v in row.reshape(-1)] for row in o] for n, o in zip(names, outs)
        },
    }
    (HERE / f"{name}.reference.json").write_text(json.dumps(reference))
    (HERE / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return session, input_name


def train_autoencoder(rng):
    n = 128
    healthy, _ = dataset(rng, n, 6000, ["healthy"])
    x = healthy / INPUT_SCALE
    ae = MLPRegressor(
        hidden_layer_sizes=(32, 8, 32),
        activation="tanh",
        max_iter=300,
        learning_rate_init=2e-3,
        random_state=SEED,
    )
    ae.fit(x, x)

    nodes = [helper.make_node("Mul", ["window", "scale"], ["x"])]
    inits = [numpy_helper.from_array(np.array([1.0 / INPUT_SCALE], np.float32), "scale")]
    prev = "x"
    layers = list(zip(ae.coefs_, ae.intercepts_))
    for i, (w, b) in enumerate(layers):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        last = i == len(layers) - 1
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["recon" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Tanh", [f"a{i}"], [f"h{i}"]))
            prev = f"h{i}"
    nodes += [
        helper.make_node("Sub", ["x", "recon"], ["err"]),
        helper.make_node("Mul", ["err", "err"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["score"], axes=[1], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "vibration-ae",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        inits,
    )

    # Threshold: the 99.5th percentile of held-out healthy scores.
    val_healthy, _ = dataset(rng, n, 2000, ["healthy"])
    kinds = ["healthy", "outer", "inner", "imbalance"]
    probes, probe_labels = dataset(rng, n, 64, kinds)
    meta = {"name": "vibration-ae", "version": 1, "input_shape": [1, n], "score_output": "score"}
    session, input_name = write_model("vibration-ae", graph, meta, probes)
    val_scores = session.run(["score"], {input_name: val_healthy})[0].reshape(-1)
    threshold = float(np.quantile(val_scores, 0.995))
    meta["anomaly_threshold"] = round(threshold * 1.2, 6)
    (HERE / "vibration-ae.meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    test, test_labels = dataset(rng, n, 2000, kinds)
    scores = session.run(["score"], {input_name: test})[0].reshape(-1)
    flagged = scores > meta["anomaly_threshold"]
    bearing = np.isin(test_labels, [1, 2])
    print(
        f"vibration-ae: threshold {meta['anomaly_threshold']:.5f}, "
        f"bearing faults flagged {flagged[bearing].mean():.1%}, "
        f"healthy flagged {flagged[test_labels == 0].mean():.2%}"
    )


def gabor_bank(k, count):
    centres = np.geomspace(40.0, 5500.0, count)
    t = (np.arange(k) - (k - 1) / 2) / FS
    bank = []
    for f in centres:
        sigma = max(2.5 / f, 1.2 * k / FS / 6)
        g = np.exp(-0.5 * (t / sigma) ** 2) * np.cos(2 * np.pi * f * t)
        bank.append(g / np.linalg.norm(g))
    return np.stack(bank).astype(np.float32)


def train_cnn(rng):
    n, k, filters = 1024, 64, 32
    kinds = ["healthy", "outer", "inner", "imbalance"]
    bank = gabor_bank(k, filters)

    def features(xs):
        x = xs / INPUT_SCALE
        windows = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)  # (B, n-k+1, k)
        conv = np.einsum("btk,fk->bft", windows, bank)
        return np.log(np.mean(conv * conv, axis=2) + 1e-6)

    train_x, train_y = dataset(rng, n, 4000, kinds)
    head = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=SEED)
    head.fit(features(train_x), train_y)
    test_x, test_y = dataset(rng, n, 1000, kinds)
    accuracy = head.score(features(test_x), test_y)

    (w0, w1), (b0, b1) = head.coefs_, head.intercepts_
    inits = [
        numpy_helper.from_array(np.array([1.0 / INPUT_SCALE], np.float32), "scale"),
        numpy_helper.from_array(bank.reshape(filters, 1, k), "bank"),
        numpy_helper.from_array(np.array([1e-6], np.float32), "eps"),
        numpy_helper.from_array(w0.astype(np.float32), "w0"),
        numpy_helper.from_array(b0.astype(np.float32), "b0"),
        numpy_helper.from_array(w1.astype(np.float32), "w1"),
        numpy_helper.from_array(b1.astype(np.float32), "b1"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([1], np.int64), "s1"),
        numpy_helper.from_array(np.array([-1, filters], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Mul", ["window", "scale"], ["x"]),
        helper.make_node("Conv", ["x", "bank"], ["bands"], kernel_shape=[k]),
        helper.make_node("Mul", ["bands", "bands"], ["power"]),
        helper.make_node("GlobalAveragePool", ["power"], ["energy3"]),
        helper.make_node("Reshape", ["energy3", "flat"], ["energy"]),
        helper.make_node("Add", ["energy", "eps"], ["energy_eps"]),
        helper.make_node("Log", ["energy_eps"], ["feat"]),
        helper.make_node("MatMul", ["feat", "w0"], ["m0"]),
        helper.make_node("Add", ["m0", "b0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["h0"]),
        helper.make_node("MatMul", ["h0", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("Slice", ["probs", "s0", "s1", "s1"], ["p_healthy"]),
        helper.make_node("Sub", ["one", "p_healthy"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bearing-cnn",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", 1, n])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(kinds)]),
        ],
        inits,
    )
    probes, _ = dataset(rng, n, 16, kinds)
    meta = {
        "name": "bearing-cnn",
        "version": 1,
        "input_shape": [1, 1, n],
        "score_output": "score",
        "classes": kinds,
        "anomaly_threshold": 0.5,
        "mflops": round(2 * (n - k + 1) * filters * k / 1e6, 2),
    }
    write_model("bearing-cnn", graph, meta, probes.reshape(-1, 1, n))
    print(f"bearing-cnn: test accuracy {accuracy:.1%}, {meta['mflops']} MFLOPs per window")


def main():
    rng = np.random.default_rng(SEED)
    train_autoencoder(rng)
    train_cnn(rng)


if __name__ == "__main__":
    main()
