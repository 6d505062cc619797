"""Image input: fetching and decoding (image_fetch.py), the model's own preprocessing
(image_processor.py), placeholder expansion and M-RoPE positions (inputs.py, mrope.py), and the
encoder-output cache (encoder_cache.py); support.py ties them together for the engine."""
