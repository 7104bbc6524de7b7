"""The Triton Python-backend model of a ddpm-deploy model repository (copied there as ``ddpm_sampler/1/model.py``).

One request = one image (or k, with a request batch of k): inputs ``seed`` UINT64 [1], ``index`` INT64 [1],
optional ``steps`` INT32 [1] and ``scheduler`` UINT8 [1024] (a name or JSON as zero-padded UTF-8); output
``image`` UINT8 [H, W, C]. Requests of different schedulers and step counts are sampled in one loop. Triton's dynamic batcher hands several requests
to ``execute`` at once; ``runtime.serve.handler.ServedModel`` samples them together.

Tensors cross the backend boundary by DLPack, not by the backend's NumPy bridge: the Python backend bundled
with Triton is built against NumPy 1.x, and under NumPy 2 its ``Tensor(name, ndarray)`` produces outputs whose
size Triton refuses ("output tensor shape does not match size of output"). DLPack works under both.

This file imports nothing from ddpm-deploy at module level: the stub's ``sys.path`` is its interpreter's, so the
serving environment's site-packages (``DDPM_SERVE_SITE_PACKAGES``, set by ``ddpm-run serve``) are added first.

The same file is ``ddpm_stream/1/model.py``, the step-level model: when its config says ``model_transaction_policy
{ decoupled: true }``, ``execute`` only checks each request and queues it for ``runtime.serve.stepper.StepLoop``
(a background thread admitting requests into free slots at every step), answers through the request's response
sender (one response per image, with its ``index``; the last one flagged final), and returns None. A request past
the wait queue's bound is answered at once with UNAVAILABLE ("the server is busy"); ``request.is_cancelled()``
frees a request's slots at the next step; ``finalize`` (SIGTERM: Triton unloads the model) fails every request still
queued or sampling.
"""

import json
import os
import site
import sys

SITE_ENV = "DDPM_SERVE_SITE_PACKAGES"
RECORD_ENV = "DDPM_SERVE_STEP_RECORD"  # a file for the step-level model's record of its ε calls (tests, benchmarks)
STOP_ENV = "DDPM_SERVE_STOP_FILE"      # created by ddpm-run serve before SIGTERM: fail the requests in flight


def _quiet_dlpack_rename(hook=sys.unraisablehook):
    """The backend marks a consumed DLPack capsule "used_dlpack" (the DLPack name is "used_dltensor"), so NumPy's
    capsule destructor reports an unraisable ValueError for each output although the backend owns and frees the
    tensor. Drop exactly that report; everything else goes to the previous hook."""

    def quiet(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, ValueError) and "PyCapsule_GetPointer called with incorrect name" in str(exc):
            return
        hook(unraisable)

    sys.unraisablehook = quiet


def _add_site_packages():
    for d in reversed([p for p in os.environ.get(SITE_ENV, "").split(os.pathsep) if p]):
        if d not in sys.path:
            site.addsitedir(d)
            sys.path.remove(d)
            sys.path.insert(0, d)  # ahead of the interpreter's own packages (its NumPy may differ)


class TritonPythonModel:
    def initialize(self, args):
        _add_site_packages()
        _quiet_dlpack_rename()
        import numpy as np
        import triton_python_backend_utils as pb_utils

        from ddpm_deploy.runtime.errors import DDPMError
        from ddpm_deploy.runtime.serve.handler import Request, RequestError, ServedModel

        self.np, self.pb, self.Request, self.RequestError = np, pb_utils, Request, RequestError
        self.DDPMError = DDPMError
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        gpu = args.get("model_instance_kind") == "GPU"
        threads = int(params.get("threads", "0"))
        if threads == 0:  # share the cores between the instances of this model
            count = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
            threads = max(1, (os.cpu_count() or 1) // count)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        try:
            self.model = ServedModel(
                os.path.join(here, params["artifact"]), device="cuda" if gpu else "cpu",
                device_id=int(args.get("model_instance_device_id", 0) or 0), threads=threads,
                max_batch=max(1, int(params.get("slots") or config.get("max_batch_size", 1))),
                default_steps=int(params["default_steps"]) if params.get("default_steps") else None,
                default_scheduler=params.get("default_scheduler") or None,
                precision=params.get("cpu_precision") or "fp32")
        except Exception as e:  # noqa: BLE001 - the load fails with the reason, the server keeps its other models
            raise pb_utils.TritonModelException(f"ddpm: cannot load {params.get('artifact')}: {e}") from None
        self.steps = None
        if self.decoupled:
            from ddpm_deploy.runtime.serve.stepper import StepLoop

            self.steps = StepLoop(self.model, queue_size=int(params.get("queue_size") or 1),
                                  record=os.environ.get(RECORD_ENV) or None)
            if os.environ.get(STOP_ENV):
                import threading

                threading.Thread(target=self._watch_stop, args=(os.environ[STOP_ENV],), daemon=True).start()
        import onnxruntime

        print(  # the stub's stderr is the server's log (pb_utils.Logger.log_info shows only with --log-verbose)
            f"ddpm: serving {params['artifact']} ({self.model.runner.name} {self.model.runner.precision}, {threads} threads, "
            f"{'step-level, ' if self.decoupled else ''}max batch {self.model.max_batch}) with numpy {np.__version__} from {os.path.realpath(os.path.dirname(np.__file__))}, "
            f"onnxruntime {onnxruntime.__version__}, Python {sys.version.split()[0]}", file=sys.stderr, flush=True)

    def _input(self, request, name):
        t = self.pb.get_input_tensor_by_name(request, name)
        return None if t is None else self.np.from_dlpack(t).copy()

    def _watch_stop(self, path):
        """``ddpm-run serve`` / ``TritonServer.stop`` create ``path`` before SIGTERM: fail what is queued or sampling
        now (Triton would wait for it, or exit without telling the clients), then say so with ``path.done``."""
        import time

        while not os.path.exists(path):
            time.sleep(0.05)
        self.steps.close("the server is shutting down; the request was not finished")
        with open(os.path.splitext(path)[0] + ".done", "w"):
            pass

    def _error(self, e):
        """A TritonError for an exception: the client's mistake → INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT); a
        full queue → UNAVAILABLE; a cancelled request → CANCELLED; a failure here → INTERNAL (500)."""
        from ddpm_deploy.runtime.serve.stepper import Busy, Cancelled

        E = self.pb.TritonError
        code = E.INVALID_ARG if isinstance(e, self.RequestError) else E.UNAVAILABLE if isinstance(e, Busy) else \
            getattr(E, "CANCELLED", E.INTERNAL) if isinstance(e, Cancelled) else E.INTERNAL
        return E(str(e), code)

    def _submit(self, request):
        """Queue one request of the step-level model; it is answered through its response sender."""
        pb, np = self.pb, self.np
        sender = request.get_response_sender()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        index = self._input(request, "index")

        sent_final = []

        def emit(k, image, last):
            out = [pb.Tensor.from_dlpack("image", np.ascontiguousarray(image[None]).__dlpack__()),
                   pb.Tensor.from_dlpack("index", np.ascontiguousarray(index.reshape(-1)[k:k + 1]).__dlpack__())]
            # the last image carries the final flag: one message to the server instead of two
            sender.send(pb.InferenceResponse(output_tensors=out), flags=final if last else 0)
            if last:
                sent_final.append(True)

        def finish(error):
            if error is None:
                if not sent_final:
                    sender.send(flags=final)
            else:
                sender.send(pb.InferenceResponse(output_tensors=[], error=self._error(error)), flags=final)

        try:
            self.steps.parse_and_submit(self.Request(seed=self._input(request, "seed"), index=index,
                                                     steps=self._input(request, "steps"),
                                                     scheduler=self._input(request, "scheduler")),
                                        emit, finish, request.is_cancelled)
        except Exception as e:  # noqa: BLE001 - refused (bad, busy, stopping): this request alone, at once
            finish(e if isinstance(e, self.DDPMError) else RuntimeError(f"{type(e).__name__}: {e}"))

    def execute(self, requests):
        if self.decoupled:
            for r in requests:
                self._submit(r)
            return None
        batch = [self.Request(seed=self._input(r, "seed"), index=self._input(r, "index"),
                              steps=self._input(r, "steps"), scheduler=self._input(r, "scheduler"))
                 for r in requests]
        responses = []
        for result in self.model.infer(batch):
            if isinstance(result, Exception):
                # the client's mistake → INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT); a failure here → INTERNAL (500)
                code = self.pb.TritonError.INVALID_ARG if isinstance(result, self.RequestError) else \
                    self.pb.TritonError.INTERNAL
                responses.append(self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(str(result), code)))
            else:
                out = self.pb.Tensor.from_dlpack("image", self.np.ascontiguousarray(result).__dlpack__())
                responses.append(self.pb.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        steps = getattr(self, "steps", None)
        if steps is not None:
            steps.close("the server is shutting down; the request was not finished")
        model = getattr(self, "model", None)
        if model is not None:
            model.close()
