"""``python -m ssl_vision.finetune ...``: the same as ``ssl-vision-finetune ...``."""

from .run import main

main()
