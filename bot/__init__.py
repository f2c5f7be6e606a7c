"""The meeting bot: joins a live meeting and analyses every participant's video.

It joins through Janus, samples each participant through the capture pipeline, and runs
the live session (invite API, WHIP ingest, consent, its card). The vision stages it uses
are shared with the workers and training, in :mod:`vision`.
"""
