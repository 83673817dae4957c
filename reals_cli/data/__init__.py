"""What the models read: image folders (`images`: the ADM crop, the class-folder dataset),
datasets written as such folders (`exports`: Fashion-MNIST, photo tiles; `shapes`: rendered
scenes with exact depth and segmentation), the probe datasets with their labels (`probe_sets`:
VOC, ADE20K, NYU, masks, depth PNGs), the latent store that `encode` writes and `train-dit`
reads (`latent_store`) and the resumable batch order (`batches`).

May import: errors, artifacts, assets, console, metrics.probe_metrics (the ignore label).
"""
