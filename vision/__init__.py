"""vision: image tokenizers, images <-> discrete codes. A patch dictionary fitted in seconds (`patch_tokenizer`)
and a VQ-VAE on diffusers' `VQModel` trained with Lightning (`tokenizer`, `lightning`); `load` opens either kind
of folder, `images` decodes image bytes and reads shard images. Imports nothing of mmdlm.
"""
