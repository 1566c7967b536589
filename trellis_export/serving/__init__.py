"""Serving Trellis streams with NVIDIA Triton Inference Server (docs/serving.md).

* :mod:`.env`: the serving environment (``trellis-export serve --setup``): a venv holding the
  ``tritonserver`` binary of the ``nvidia-pytriton`` wheel, numpy < 2, onnxruntime and this package;
* :mod:`.repo`: ``trellis-export triton-repo``: a model repository (python-backend model around a
  :class:`~trellis_export.runtime.pool.StreamPool`, and GPU configs with implicit state);
* :mod:`.checks`: every generated ``config.pbtxt`` parsed with ``model_config_pb2`` and checked against
  the ONNX graph and the state spec;
* :mod:`.server`: start / stop the real ``tritonserver`` on loopback ports;
* :mod:`.client`: :class:`~trellis_export.serving.client.StreamClient`, a gRPC sequence client.

``triton_model.py`` is the python-backend model template; it runs only inside Triton's stub.
"""
