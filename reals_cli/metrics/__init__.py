"""Numbers about images and predictions: FID, sFID, IS, KID, precision/recall (`fid`) over the
Inception network (`inception`), PSNR/SSIM (`image_metrics`), and the probes' mIoU and depth
errors (`probe_metrics`).

May import: errors, artifacts, assets, console, runtime, data (to read image folders).
"""
