"""HTTP OCR service with two variants of the OCR system, ``baseline`` and ``candidate`` (``tools/serve.py``).

Modules, from pure logic up to the server:

* :mod:`export.serving.config`: the ``configs/serve.yml`` schema, parsed strictly (``compress.config``);
* :mod:`export.serving.routing`: canary share, sticky keys, rollout steps, promotion and rollback;
* :mod:`export.serving.guardrails`: sliding windows of latency, errors and shadow agreement, and their verdict;
* :mod:`export.serving.agreement`: how far two OCR answers for one image agree (``compress.fidelity``);
* :mod:`export.serving.images`: request bodies to BGR images, with size and pixel limits;
* :mod:`export.serving.variants`: the model folders of a variant and its pool of loaded ``OcrSystem`` workers;
* :mod:`export.serving.metrics`: the Prometheus metrics;
* :mod:`export.serving.service` / :mod:`export.serving.app`: request handling (admission, timeouts, shadow
  traffic, guardrails) and the Starlette routes;
* :mod:`export.serving.drill`: a deliberately broken candidate (one conv's weights perturbed in a copy) for the
  rollback drill and the tests.
"""
