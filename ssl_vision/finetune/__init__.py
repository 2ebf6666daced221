"""End-to-end fine-tuning of a pre-trained backbone: ``ssl-vision-finetune checkpoint=<run>/checkpoints/last.ckpt``.

The protocols are the ``conf/finetune`` presets: ``mae_vit_base`` (facebookresearch/mae FINETUNE.md: AdamW,
layer-wise lr decay, drop path, RandAugment, random erasing, mixup / cutmix, label smoothing, global average
pooling + fc_norm), ``resnet_sgd`` (google-research/simclr's semi-supervised fine-tune: Nesterov SGD, crop +
flip) and ``digits`` (the fast CPU default). Where things live:

- ``model``: the timm classifier around the backbone, head initialisation, MAE's layer-wise lr decay groups
  and schedule, the optimizer.
- ``module``: ``FineTuner``, the LightningModule (an ``SSLMethod`` with a classification objective: mixup,
  the loss, top-1 / top-5).
- ``run``: the entry point - the labelled data (``FineTuneData``), one fine-tune per seed and initialisation,
  ``finetune_summary.json``, the curves, the timm export.
- ``plots``: ``finetune_curves.png``.
"""

from .model import init_head, layer_decay_groups, load_pretrained, schedule_lr, vit_layer_id
from .module import FineTuner
from .run import FineTuneData, main, run

__all__ = ["FineTuneData", "FineTuner", "init_head", "layer_decay_groups", "load_pretrained", "main", "run",
           "schedule_lr", "vit_layer_id"]
