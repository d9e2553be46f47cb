"""The learned column finder's training side: simulated training data, the U-Net, training, ONNX export.

Only :mod:`beamloop.edge.learn.model`, :mod:`beamloop.edge.learn.train` and :mod:`beamloop.edge.learn.export` import
PyTorch (the
``train`` extra); :mod:`beamloop.edge.learn.dataset` needs numpy and numba only. Serving lives in
:mod:`beamloop.edge.stages.unet`.
"""
