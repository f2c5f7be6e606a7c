"""The inference side and the Celery workers.

Stages (import only the kernel): the ONNX runners (``runners``, ``landmarks``), the pure
crop-analysis function (``inference``), persistence (``persistence``), the in-process
dispatcher (``dispatch``) and the record of failed batches (``failures``). Orchestration:
the Celery app and tasks (``celery_app``, ``tasks``), the producers' Celery dispatchers
(``celery_dispatch``, ``segment_dispatch``), a worker's analysis of one time segment
(``segments``) and the scheduled jobs (``maintenance``). Entry point: ``worker_main``.
"""
