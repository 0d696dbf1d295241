"""Times the vision models through onnxruntime's Python API, for bench-vision's Rust-vs-Python table.

Same model files, intra-op thread count, spinning setting and batch shapes as the Rust engine
(graph optimisation level "all" = the engine's Level3). Inputs are fixed random tensors shaped like
production inputs. Prints one JSON object: per model, the median and all per-batch latencies in ms.
With --sweep, times only SigLIP's image tower at each batch size instead (what SigLIP alone sustains:
images/s at each size, and the best), as bench-vision's ceiling for the pipeline's frames/s.

usage: ort_vision.py --yunet PATH --siglip PATH --threads N --spin 0|1 --batch B --iters K
       ort_vision.py --siglip PATH --threads N --spin 0|1 --sweep 1,2,4,8 --iters K
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path, threads, spin):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def timed(sess, feeds, iters, warm=3):
    for _ in range(warm):
        sess.run(None, feeds)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, feeds)
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--yunet")
    ap.add_argument("--siglip", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--spin", type=int, default=1)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sweep", help="comma-separated SigLIP batch sizes: time SigLIP alone")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    if a.sweep:
        s = session(a.siglip, a.threads, a.spin)
        sname = s.get_inputs()[0].name
        res = {"onnxruntime": ort.__version__, "images_per_s": {}, "median_ms": {}, "cpu_ms_per_image": {}}
        for b in [int(x) for x in a.sweep.split(",")]:
            feeds = {sname: rng.uniform(-1, 1, (b, 3, 224, 224)).astype(np.float32)}
            before = os.times()
            ms = statistics.median(timed(sess=s, feeds=feeds, iters=a.iters, warm=1))
            after = os.times()
            cpu = (after.user - before.user) + (after.system - before.system)
            res["cpu_ms_per_image"][str(b)] = cpu * 1000.0 / ((a.iters + 1) * b)
            res["median_ms"][str(b)] = ms
            res["images_per_s"][str(b)] = b / (ms / 1000.0)
        best = max(res["images_per_s"], key=res["images_per_s"].get)
        res["best_batch"], res["best_images_per_s"] = int(best), res["images_per_s"][best]
        print(json.dumps(res))
        return
    y = session(a.yunet, a.threads, a.spin)
    yx = (rng.random((1, 3, 640, 640), dtype=np.float32) * 255.0).astype(np.float32)
    s = session(a.siglip, a.threads, a.spin)
    sname = s.get_inputs()[0].name
    res = {"onnxruntime": ort.__version__}
    for key, sess, feeds in [
        ("yunet_b1", y, {"input": yx}),
        ("siglip_b1", s, {sname: rng.uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)}),
        (f"siglip_b{a.batch}", s, {sname: rng.uniform(-1, 1, (a.batch, 3, 224, 224)).astype(np.float32)}),
    ]:
        ms = timed(sess, feeds, a.iters)
        res[key] = {"median_ms": statistics.median(ms), "runs": len(ms)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
