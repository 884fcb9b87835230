"""Speech-to-text runtime: Whisper through faster-whisper (CTranslate2), served as OpenAI's
POST /v1/audio/transcriptions.

audio.py decodes uploads; chunks.py splits at silences; decode.py runs one batch through the
model; engine.py owns the worker thread that batches chunks across requests; formats.py renders
responses; api.py is the HTTP route; serving.py is the replica's Runtime.
"""
