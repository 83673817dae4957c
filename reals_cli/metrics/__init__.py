"""Numbers about images and predictions: FID, sFID, IS, KID, precision/recall (`fid`) over the
Inception network (`inception`), the same distance in a domain classifier's features and
that classifier's class accuracy of samples (`classifier`), PSNR/SSIM (`image_metrics`), and the probes' mIoU and depth
errors (`probe_metrics`); a small classifier trained on the domain, whose feature-space Frechet
distance and class accuracy of samples stand beside Inception FID (`classifier`).

May import: errors, artifacts, assets, console, runtime, data (to read image folders and stores).
"""
