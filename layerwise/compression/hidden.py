"""Read a recommender's hidden states at layer boundaries with forward hooks (no change to the model)."""

from __future__ import annotations

import torch

from layerwise.device import model_device
from layerwise.models.recommender import SequentialRecommender


def capture_layer_inputs(model: SequentialRecommender, inputs: torch.Tensor, start: int = 0
                         ) -> tuple[dict, torch.Tensor]:
    """Run the model on `inputs` (B, T) and return its states at every layer boundary.

    `start`: the full-window index of the first column when leading padding was cut (see
    `SequentialRecommender.encode`).

    Returns (states, mask): states[l] (B, T, H) is the input of layer l for l < n_layers (after any
    bridge in that slot), states[n_layers] the output of the last layer (after a final bridge, before the
    backbone's final norm) and states["final"] the backbone's last hidden state; mask (B, T) is True at
    non-padding positions. Gradients flow through the states when autograd is enabled.
    """
    inputs = inputs.to(model_device(model))  # the mask is then where the states are
    states: dict = {}
    layers = model.layers
    handles = []
    for index, layer in enumerate(layers):
        def pre(module, args, kwargs, index=index):
            states[index] = args[0]
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))

    def post(module, args, output):
        states[len(layers)] = output[0] if isinstance(output, tuple) else output
    # Registered last, so it sees the output after a slot-k bridge hook has transformed it.
    handles.append(layers[-1].register_forward_hook(post))
    try:
        states["final"] = model.encode(inputs, start=start)
    finally:
        for handle in handles:
            handle.remove()
    return states, inputs != 0
