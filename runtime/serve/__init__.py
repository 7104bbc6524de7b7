"""Serving on Triton Inference Server (no torch): the model repository writer, the Python-backend model
(``triton_model.py``, copied into the repository as ``1/model.py``), the request handler it drives, the server
launcher and the client."""
