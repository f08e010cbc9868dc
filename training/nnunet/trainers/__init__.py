"""nnU-Net trainer variants of ours, found by nnU-Net through ``nnUNet_extTrainer`` (this folder).

nnU-Net looks trainers up by class name, in its own package and then in the folders that
``nnUNet_extTrainer`` lists, importing each module here as a top-level module; so these modules import
only nnU-Net and torch, never ``training``.
"""
