"""The text-to-speech runtime: Piper voices behind the OpenAI speech API.

`sentences.py` splits text into sentences (whole texts and text arriving token by token),
`encode.py` turns 16-bit samples into wav / pcm / flac / mp3 bytes as they come, `synth.py` owns
the voice and its one worker thread (sentences of every request interleaved by deadline),
`api.py` the HTTP and WebSocket endpoints, `serving.py` the Runtime the replica server runs.
"""
