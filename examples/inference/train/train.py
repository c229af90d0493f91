"""Trains the inference example's three models and writes what the tests compare.

Offline and reproducible: scikit-learn's bundled breast-cancer data set (569
records, 30 features; no download), a fixed split and fixed seeds. Writes, beside
this folder:

  models/logreg.onnx   StandardScaler + LogisticRegression
  models/forest.onnx   RandomForestClassifier (no scaling)
  models/mlp.onnx      StandardScaler + MLPClassifier (16, 8)
  data/heldout.csv     the held-out records: record_id and the 30 features
  data/expected-<model>.csv   scikit-learn's predict_proba on them
  data/distribution.json      per-class mean and Cholesky factor of the
                              training covariance (synthetic records for the
                              throughput benchmark are drawn from it)

Every model is exported by skl2onnx (zipmap=False: a plain probabilities
tensor). tract, the engine inside the enclave, lacks the ONNX-ML `Scaler`
operator, so each Scaler node is rewritten into standard `Sub` and `Mul`
(Y = (X - offset) * scale, which is what Scaler computes). Each exported file is
then checked with onnxruntime against scikit-learn before it is written.

The records are float32 on every side: scikit-learn's expected outputs are
computed on the float32 values that the CSV holds exactly, so the enclave and
scikit-learn see the same inputs bit for bit.
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from skl2onnx import to_onnx
from skl2onnx.common import tree_ensemble
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

TOLERANCE = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def f32_text(v):
    """The shortest decimal that reads back as this float32."""
    return np.format_float_positional(np.float32(v), unique=True, trim="-")


def _int_missing_flags(add_node):
    """skl2onnx passes tree nodes' missing-value flags as a mix of Python bools
    and numpy integers, which onnx refuses in an `ints` attribute; make them ints
    (the values are unchanged: sklearn sends missing values left or right)."""

    def wrapped(*args, nodes_missing_value_tracks_true=False, **kwargs):
        return add_node(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs)

    return wrapped


tree_ensemble.add_node = _int_missing_flags(tree_ensemble.add_node)


def rewrite_scalers(model):
    """Replaces every ai.onnx.ml Scaler node with Sub(offset) then Mul(scale)."""
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type != "Scaler":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        offset = np.asarray(attrs["offset"], dtype=np.float32)
        scale = np.asarray(attrs["scale"], dtype=np.float32)
        name = node.name or node.output[0]
        graph.initializer.append(numpy_helper.from_array(offset, f"{name}_offset"))
        graph.initializer.append(numpy_helper.from_array(scale, f"{name}_scale"))
        centred = f"{name}_centred"
        nodes.append(helper.make_node("Sub", [node.input[0], f"{name}_offset"], [centred], name=f"{name}_sub"))
        nodes.append(helper.make_node("Mul", [centred, f"{name}_scale"], [node.output[0]], name=f"{name}_mul"))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def export(pipeline, x_sample):
    model = to_onnx(
        pipeline,
        x_sample[:1],
        options={id(pipeline): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    model = rewrite_scalers(model)
    left = sorted({n.op_type for n in model.graph.node} & {"Scaler", "ZipMap"})
    assert not left, f"operators tract lacks are still in the graph: {left}"
    # skl2onnx lists opset imports in set order; sort them so that the bytes
    # (and so the model's SHA-256 that the image pins) are reproducible.
    opsets = sorted(model.opset_import, key=lambda o: o.domain)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.producer_name = "cloister examples/inference/train"
    model.doc_string = "Breast-cancer classifier; input 'X' float32 [N,30], output 'probabilities' float32 [N,2]"
    return model


def check(model, x, expected, name):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"X": x})
    worst = float(np.max(np.abs(probabilities - expected)))
    if worst > TOLERANCE:
        sys.exit(f"{name}: onnxruntime differs from scikit-learn by {worst:g} (> {TOLERANCE:g})")
    print(f"  {name}: onnxruntime within {worst:.2e} of scikit-learn on {len(x)} records")


def main():
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target
    ids = np.arange(len(x))
    x_train, x_test, y_train, y_test, _, id_test = train_test_split(
        x, y, ids, test_size=0.25, random_state=20261129, stratify=y
    )
    columns = [n.replace(" ", "_") for n in data.feature_names]
    models = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=1)),
        "forest": RandomForestClassifier(n_estimators=60, max_depth=8, random_state=1),
        "mlp": make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=3000, random_state=1),
        ),
    }
    os.makedirs(os.path.join(ROOT, "models"), exist_ok=True)
    os.makedirs(os.path.join(ROOT, "data"), exist_ok=True)

    with open(os.path.join(ROOT, "data", "heldout.csv"), "w") as out:
        out.write("record_id," + ",".join(columns) + "\n")
        for rid, row in zip(id_test, x_test):
            out.write(f"r{rid:04d}," + ",".join(f32_text(v) for v in row) + "\n")

    for name, estimator in models.items():
        estimator.fit(x_train, y_train)
        expected = estimator.predict_proba(x_test)
        accuracy = float(np.mean(estimator.predict(x_test) == y_test))
        model = export(estimator, x_train)
        check(model, x_test, expected, name)
        onnx.save(model, os.path.join(ROOT, "models", f"{name}.onnx"))
        with open(os.path.join(ROOT, "data", f"expected-{name}.csv"), "w") as out:
            out.write("record_id,p_malignant,p_benign\n")
            for rid, (p0, p1) in zip(id_test, expected):
                out.write(f"r{rid:04d},{p0!r},{p1!r}\n")
        print(f"  {name}: held-out accuracy {accuracy:.3f}")

    distribution = {"features": columns, "classes": {}}
    for label, cls in enumerate(data.target_names):
        rows = x_train[y_train == label].astype(np.float64)
        cov = np.cov(rows, rowvar=False) + np.eye(rows.shape[1]) * 1e-9
        distribution["classes"][str(cls)] = {
            "weight": float(np.mean(y_train == label)),
            "mean": rows.mean(axis=0).tolist(),
            "cholesky": np.linalg.cholesky(cov).tolist(),
        }
    with open(os.path.join(ROOT, "data", "distribution.json"), "w") as out:
        json.dump(distribution, out, indent=1)
        out.write("\n")


if __name__ == "__main__":
    main()
