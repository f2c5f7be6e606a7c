"""The capture pipeline and what every orchestration shares: loaded models and the final step.

``models``: the configured models, resolved through the model cache and loaded once per
process (:class:`~pipeline.models.PipelineComponents`). ``capture``: frames in, tracked
faces and crop batches out (:class:`~pipeline.capture.CapturePipeline`), the one place
the detect → track → crop loop is written; recordings, segments, live streams, training
and the benchmarks all use it. ``finalise``: the step every orchestration ends with,
turning track summaries into students, or marking an analysis failed. The package imports
the stages (vision, workers' inference side, model_export) and the kernel, nothing above.
"""
