"""The same seed gives the same numbers for any --workers: every random draw of the data pipeline
(the order and each augmentation) is a function of (seed, epoch, sample index) alone."""
import json
import re

import pytest
import torch

import biomedap
import biomedvr
import data
import runner

METHODS = {"biomedap": biomedap, "biomedvr": biomedvr}
TINY = dict(dataset="synthetic", backbone="tiny", shots=3, epochs=2, seed=3, device="cpu", batch_size=4)


def train(name, workers, out, capsys, **over):
    """metrics.json without the timings and the worker count, the epoch lines without their seconds,
    and the learned tensors of a finished run."""
    module = METHODS[name]
    capsys.readouterr()
    runner.run(module, runner.cli_args(module)(**{**TINY, "workers": workers, "out": str(out), **over}))
    epochs = [re.sub(r" time [\d.]+s$", "", line) for line in capsys.readouterr().out.splitlines()
              if line.startswith("epoch ")]
    folder = runner.run_dir(str(out), name, "synthetic", TINY["shots"], TINY["seed"], backbone="tiny")
    record = json.loads((folder / "metrics.json").read_text())
    del record["timings"], record["args"]["workers"], record["args"]["out"]
    return record, epochs, runner.load_checkpoint(folder)["trainable"]


@pytest.mark.parametrize("name", METHODS)
def test_zero_and_two_workers_give_the_same_run(name, tmp_path, capsys):
    record0, epochs0, learned0 = train(name, 0, tmp_path / "w0", capsys)
    record2, epochs2, learned2 = train(name, 2, tmp_path / "w2", capsys)
    assert len(epochs0) == TINY["epochs"] and epochs0 == epochs2  # every loss term of every epoch
    assert record0 == record2  # metrics, confusion matrices, BioMedVR's gate and history
    assert learned0.keys() == learned2.keys()
    assert all(torch.equal(learned0[k], learned2[k]) for k in learned0)


def test_an_augmentation_is_a_function_of_seed_epoch_and_index():
    items = data.load_splits("synthetic", image_size=48).train[:6]
    transform = data.build_transform(32, train=True, hflip=True)
    dataset = data.ImageDataset(items, transform)

    def epoch_images(seed, epoch, workers):
        loader = data.make_loader(dataset, 3, True, seed, workers)
        loader.sampler.set_epoch(epoch)
        return [(x, y) for x, y in loader]

    torch.manual_seed(0)
    first = epoch_images(1, 1, 0)
    before = torch.get_rng_state()
    again = epoch_images(1, 1, 2)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left alone
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in epoch_images(1, 2, 0)]))
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in epoch_images(2, 1, 0)]))
    # a sample's draws do not depend on its neighbours in the batch or the order of the epoch
    seed = data.draw_seed(1, 1, 4)
    assert torch.equal(dataset[(4, seed)][0], dataset[(4, seed)][0])
    sampler = data.EpochSampler(6, 1, shuffle=True)
    sampler.set_epoch(1)
    order = [i for i, _ in sampler]
    assert sorted(order) == list(range(6))
    position = order.index(4)
    assert torch.equal(torch.cat([x for x, _ in first])[position], dataset[(4, seed)][0])


def test_each_image_gets_a_new_augmentation_every_epoch():
    """The draw follows the epoch: with the order of each epoch undone, every image of epoch 2 is
    cropped and flipped otherwise than in epoch 1 (a draw that ignored the epoch would repeat them,
    while the shuffled order alone would still make the epochs' batches differ)."""
    items = data.load_splits("synthetic", image_size=48).train[:8]
    loader = data.make_loader(data.ImageDataset(items, data.build_transform(32, train=True, hflip=True)), 4, True, 1)

    def by_index(epoch):
        loader.sampler.set_epoch(epoch)
        order = [index for index, _ in loader.sampler]
        images = torch.cat([x for x, _ in loader])  # (8, 3, 32, 32) in the epoch's order
        return {index: images[position] for position, index in enumerate(order)}
    first, second = by_index(1), by_index(2)
    assert sorted(first) == sorted(second) == list(range(8))
    assert all(not torch.equal(first[i], second[i]) for i in range(8))
    assert all(torch.equal(first[i], image) for i, image in by_index(1).items())  # and epoch 1 again is epoch 1


@pytest.mark.parametrize("name", METHODS)
def test_resume_with_another_worker_count_ends_as_an_uninterrupted_run(name, tmp_path, capsys):
    """--workers is a field with resume_may_differ: a run stopped with 0 workers and resumed with 2
    ends with exactly the numbers of a run that never stopped."""
    whole, epochs, learned = train(name, 0, tmp_path / "whole", capsys)
    module = METHODS[name]
    runner.run(module, runner.cli_args(module)(**{**TINY, "workers": 0, "out": str(tmp_path / "split"), "stop_after_epoch": 1}))
    resumed, resumed_epochs, resumed_learned = train(name, 2, tmp_path / "split", capsys, resume=True)
    del whole["args"]["resume"], resumed["args"]["resume"]
    assert resumed == whole and resumed_epochs == epochs[1:]
    assert all(torch.equal(learned[k], resumed_learned[k]) for k in learned)
