"""The learned column finder's training side: simulated training data, the U-Net, training, ONNX export.

Only :mod:`edge.learn.model`, :mod:`edge.learn.train` and :mod:`edge.learn.export` import PyTorch (the
``train`` extra); :mod:`edge.learn.dataset` needs numpy and numba only. Serving lives in :mod:`edge.segment`.
"""
