"""Numbers about images and predictions: FID, sFID, IS, KID, precision/recall (`fid`) over the
Inception network (`inception`); a small classifier trained on the domain, whose feature-space
Frechet distance and class accuracy of samples stand beside Inception FID (`classifier`);
PSNR/SSIM (`image_metrics`); the probes' mIoU and depth errors (`probe_metrics`); and the
mean and 95% t-interval over seeds that every experiment page reports (`intervals`).

May import: errors, artifacts, assets, console, runtime, data (to read image folders and stores).
"""
