"""CUDA-graph capture for the benchmarks: warm fn up on a side stream (as torch requires before
capture), then record one call. Replaying the graph times the kernels without the host launch cost."""
import torch


def capture(fn, warmup=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g
