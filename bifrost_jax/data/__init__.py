"""Data: TFDS builders written as array_record without TensorFlow (``shapes``: synthetic coloured shapes with
held-out combinations; ``captions``: users' image-caption folders or JSONL; ``imagenet``: tfds imagenet2012 in the
same element format), grain pipelines (``pipeline``), host-side preprocessing into the ViT and VAE views
(``preprocess``), Qwen2.5-VL image preprocessing (``qwen_image``) and prompt construction (``prompt``).

Every builder yields elements {"image": encoded image bytes, "caption": text, ...}; ``preprocess`` decodes them.
"""
