"""The stopping rule (--stop_patience): train until a figure stops improving, on images that are never the reported
ones, and say whether the plateau or the cap stopped it."""

STOP_KEY = 'stop_psnr'  # each epoch's mean PSNR on the stopping images (--stop_patience), in the training history


class Plateau:
    """The stopping rule (--stop_patience K, --stop_delta D): a figure (`key` of each epoch's row: the PSNR on the
    stopping images, which should rise, or a defence's training objective, which should fall, by a fraction D of
    itself with `relative`) has not improved by D on its best for K epochs. Rebuilt from a history, so a resumed
    run stops where the uninterrupted one would."""

    def __init__(self, patience, delta, key, history=(), rising=True, relative=False):
        self.patience, self.delta, self.key, self.rising, self.relative = patience, delta, key, rising, relative
        self.best, self.best_epoch = None, 0
        for row in history:
            self.update(row)

    def update(self, row):
        if not self.patience:  # off: there is nothing to follow
            return
        value = row[self.key] if self.rising else -row[self.key]
        margin = self.delta * abs(self.best) if self.relative and self.best is not None else self.delta
        if self.best is None or value > self.best + margin:
            self.best, self.best_epoch = value, row['epoch']

    def reached(self, epoch):
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    def record(self, epochs, cap):
        """What the rule did: the epoch of the last improvement, and whether it stopped training or `cap` did."""
        return {'patience': self.patience, 'delta': self.delta, 'on': self.key, 'best_epoch': self.best_epoch,
                'epochs': epochs, 'plateau_reached': self.reached(epochs), 'cap_hit': not self.reached(epochs) and
                epochs >= cap}


def training_record(history, training=None, cap=None):
    """How long the decoder an evaluation used was trained (epochs, minutes), from its history up to the epoch it
    was saved at, and (--stop_patience, in `training`, a config.TrainConfig) whether it stopped on a plateau or at
    the cap of `cap` epochs: recorded in the eval json, the one place tables read it from."""
    record = {'epochs': len(history), 'minutes': sum(h['seconds'] for h in history) / 60}
    if training is not None and training.stop_patience and history:
        record['stopping'] = Plateau(training.stop_patience, training.stop_delta, STOP_KEY, history).record(
            len(history), cap)
    return record


def stopping_note(record, what='training'):
    """The log's line on what stopped `what` (training, defence training): a plateau of its figure, or the cap."""
    figure = ('the PSNR on the stopping images', 'dB') if record['on'] == STOP_KEY else (
        'its objective (KL + privacy term)', 'of itself')
    last = f'{figure[0]} last improved by {record["delta"]:g} {figure[1]} at epoch {record["best_epoch"]}'
    if record['plateau_reached']:
        return f'{what} stopped after epoch {record["epochs"]}: {last}, {record["patience"]} epochs before'
    return f'the cap of {record["epochs"]} epochs stopped {what} before a plateau ({last}): it may still improve'
