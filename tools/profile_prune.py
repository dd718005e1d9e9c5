"""Where the time of one nisp-onnx run goes: a cProfile of `prune()` on random inputs.

    python tools/profile_prune.py build/models/resnet50_torchscript.onnx --samples 256

Prints the stage times of the report and the functions that take the most time
(cumulative), for the repair's parts: onnxruntime runs, Gram sums, im2col rows, Cholesky
factorisations, the Relu refinement.
"""

import argparse
import cProfile
import pstats

import numpy as np

from nisp_onnx import ArrayReader, load_model, prune


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repair", default="ls")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    proto = load_model(args.model).proto
    inp = next(
        i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}
    )
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).standard_normal((args.samples, *shape)).astype(np.float32)
    profile = cProfile.Profile()
    profile.enable()
    report = prune(
        args.model, None, ArrayReader({inp.name: x}, [inp.name], 32), args.ratio, repair=args.repair
    )
    profile.disable()
    print("stages (s):", report.timings)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
