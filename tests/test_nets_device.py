"""The --device option, read one way by every command."""
import pytest
import torch


def test_resolve_device_reads_the_option_once_for_every_command():
    from segswap.nets.device import resolve_device

    cuda = torch.cuda.is_available()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda:0") if cuda else torch.device("cpu"))
    if cuda:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda:0")
    else:
        with pytest.raises(ValueError, match="'cuda:1' requested but CUDA is not available"):
            resolve_device("cuda:1")
