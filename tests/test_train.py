"Training one configuration: the papermill run, resumption after kills, failure statuses, early stopping (tests/test_predict.py: learning)."
import json, os, signal, subprocess, sys, time
import pandas as pd, pytest
import keras, tensorflow as tf  # the micro-batch tests train in this process
from conftest import logged_epochs, run_beadseg, ROOT

TINY = ('--image-size', '64', '--base-filters', '8', '--batch-size', '4', '--learning-rate', '1e-3', '--val-split', '0.25')
HISTORY_COLUMNS = ['epoch', 'loss', 'val_loss', 'jaccard', 'val_jaccard', 'dice', 'val_dice', 'learning_rate', 'epoch_seconds']


@pytest.fixture(scope='module')
def beads(tmp_path_factory):
    from beadseg.synthetic import synthesize
    return synthesize(tmp_path_factory.mktemp('data')/'beads', n_images=8, size=128, seed=1, preset='easy')


def train_cli(beads, out, *args, **kw):
    return run_beadseg('train', '--dataset', beads, '--out-dir', out, *TINY, *args, **kw)


def wait_for_epochs(out, n, process, timeout=240):
    "Wait until `history.csv` has `n` rows and their resume point is saved."
    end = time.time() + timeout
    while time.time() < end:
        if logged_epochs(out/'history.csv') >= n and (out/'state'/f'epoch_{n:04d}'/'manifest.json').is_file():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise TimeoutError(f'no epoch {n} within {timeout} s')


def start_train(beads, out, *args):
    exe = os.path.join(os.path.dirname(sys.executable), 'beadseg')
    return subprocess.Popen([exe, 'train', '--dataset', str(beads), '--out-dir', str(out), *TINY, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_sigterm_then_kill_then_rerun_continues_without_duplicates(beads, tmp_path):
    out = tmp_path/'run'
    # SIGTERM (a scheduler's walltime warning): the current epoch finishes, then the run stops as interrupted
    first = start_train(beads, out, '--max-epochs', '5')
    wait_for_epochs(out, 1, first)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    interrupted = json.loads((out/'result.json').read_text())
    assert interrupted['status'] == 'interrupted', interrupted
    stopped_at = interrupted['epochs_run']
    assert 1 <= stopped_at < 5
    # SIGKILL of everything after one more epoch
    second = start_train(beads, out, '--max-epochs', '5')
    wait_for_epochs(out, stopped_at + 1, second)
    os.killpg(second.pid, signal.SIGKILL)
    second.communicate()
    # the rerun continues from the last saved epoch and finishes
    third = train_cli(beads, out, '--max-epochs', '5')
    assert third.returncode == 0, third.stderr[-2000:]
    assert 'Resuming after epoch' in third.stdout and 'Epoch 1/5' not in third.stdout
    assert 'completed' in third.stdout.splitlines()[-1]
    history = pd.read_csv(out/'history.csv')
    assert list(history.columns) == HISTORY_COLUMNS and list(history.epoch) == [1, 2, 3, 4, 5]
    # every output of a papermill run is there
    assert {'history.csv', 'model.keras', 'train.ipynb', 'result.json', 'split.json', 'predictions.png'} <= {p.name for p in out.iterdir()}
    result = json.loads((out/'result.json').read_text())
    assert result['status'] == 'completed' and result['epochs_run'] == 5 and result['error'] is None
    assert result['best_val_jaccard'] == pytest.approx(history.val_jaccard.max())
    assert result['config']['image_size'] == 64 and result['config']['architecture'] == 'unet'
    for key in ('train_seconds', 'seconds_per_epoch', 'images_per_second', 'params', 'peak_memory_mb', 'device',
                'git_commit', 'versions', 'dataset_summary'):
        assert result[key] is not None, key
    evaluation = result['evaluation']
    assert 0 <= evaluation['jaccard'] <= 1 and 0 < evaluation['baseline_jaccard'] < 1
    assert evaluation['n_images'] == len(json.loads((out/'split.json').read_text())['val'])
    notebook = json.loads((out/'train.ipynb').read_text())
    assert any(o.get('output_type') == 'display_data' for c in notebook['cells'] for o in c.get('outputs', []))
    # a finished configuration is not run again
    stamp = (out/'train.ipynb').stat().st_mtime
    again = train_cli(beads, out, '--max-epochs', '5')
    assert again.returncode == 0 and (out/'train.ipynb').stat().st_mtime == stamp and 'already done' in again.stdout
    assert json.loads((out/'result.json').read_text())['finished'] == result['finished']
    assert_tensorboard_logs(out, history, result)
    assert_loads_elsewhere(out/'model.keras', result['config']['loss_function'])


def assert_tensorboard_logs(out, history, result):
    "The TensorBoard logs of a run stopped by SIGTERM, killed (-9) in an epoch and resumed: one scalar per epoch and tag, as in history.csv."
    from beadseg.tensorboard_logs import read_scalars
    scalars = read_scalars(out/'tensorboard')
    curves = scalars[~scalars.tag.str.startswith('evaluation/')]
    steps = curves.groupby(['run', 'tag']).step.apply(sorted)
    assert len(steps) == 8 and all(s == list(history.epoch) for s in steps), steps  # no step twice, none missing
    for run, tag, column in (('train', 'epoch_loss', 'loss'), ('validation', 'epoch_jaccard', 'val_jaccard')):
        logged = curves[(curves.run == run) & (curves.tag == tag)].sort_values('step').value
        assert logged.to_numpy() == pytest.approx(history[column].to_numpy(), rel=1e-5), (run, tag)
    score = scalars[scalars.tag == 'evaluation/jaccard']
    assert score.step.tolist() == [result['best_epoch']] and score.value.iloc[0] == pytest.approx(result['evaluation']['jaccard'])


def assert_loads_elsewhere(path, loss):
    """A trained model.keras loads compiled after `import beadseg` (here before TensorFlow, which imports Keras itself), and
    without beadseg uncompiled, each in a fresh Python (both at once: 7.5 s on an idle machine)."""
    compiled = ("import beadseg, tensorflow, keras, numpy as np; m = keras.models.load_model({!r}); x = np.zeros((1, 64, 64, 1)); "
                "print(type(m.loss).__name__, m.loss.loss, sorted(m.evaluate(x, x, verbose=0, return_dict=True)))")
    bare = ("import sys, keras, numpy as np; m = keras.models.load_model({!r}, compile=False); "
            "print(m.predict(np.zeros((1, 64, 64, 1)), verbose=0).shape, [k for k in sys.modules if k.startswith('beadseg')])")
    env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
    runs = [subprocess.Popen([sys.executable, '-c', code.format(str(path))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=path.parent) for code in (compiled, bare)]
    (out1, err1), (out2, err2) = [r.communicate(timeout=180) for r in runs]
    assert out1.strip() == f"SegmentationLoss {loss} ['dice', 'jaccard', 'loss']", err1[-2000:]
    assert out2.strip() == '(1, 64, 64, 1) []', err2[-2000:]


def test_bad_configuration_fails_at_once_with_one_line_and_a_result(beads, tmp_path):
    "One case through the command (03_train checks the others: an unknown loss, an image size not divisible by 16)."
    out, message = tmp_path/'run', "Unknown architecture 'vnet'"
    done = train_cli(beads, out, '--max-epochs', '1', '--architecture', 'vnet')
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('beadseg train: error: ') and message in lines[0]
    result = json.loads((out/'result.json').read_text())
    assert result['status'] == 'failed' and message in result['error']
    assert not (out/'train.ipynb').exists()  # failed before any notebook ran


def test_unusable_data_fails_before_training(tmp_path):
    "An empty dataset (the search's tests cover a batch larger than the training set)."
    out, message = tmp_path/'run', 'images: no images (.tif'
    (tmp_path/'empty'/'images').mkdir(parents=True); (tmp_path/'empty'/'masks').mkdir()
    done = run_beadseg('train', '--dataset', tmp_path/'empty', '--out-dir', out, *TINY, '--max-epochs', '1')
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    result = json.loads((out/'result.json').read_text())
    assert result['status'] == 'failed' and message in result['error'] and 'epochs_run' not in result
    assert not (out/'history.csv').exists()


def tiny_config(beads, out, **changes):
    from beadseg.config import PROJECT_SETTINGS, load_settings
    from beadseg.train import config_from_settings
    tiny = dict(dataset=str(beads), out_dir=str(out), image_size=64, base_filters=8, batch_size=4, val_split=0.25)
    return config_from_settings(load_settings(PROJECT_SETTINGS), **{**tiny, **changes})


def test_patience_stops_early_and_keeps_the_best_epoch(beads, tmp_path):
    import keras
    from beadseg import pipeline
    from beadseg.train import train, prepare_data
    config = tiny_config(beads, tmp_path/'run', learning_rate=3e-2, patience=1, max_epochs=12, loss_function='dice')
    result = train(config, verbose=0)
    assert result['status'] == 'early_stopped'
    assert result['best_epoch'] < result['epochs_run'] < 12
    history = pd.read_csv(tmp_path/'run'/'history.csv')
    assert history.val_jaccard.idxmax() + 1 == result['best_epoch']
    # the saved model is the best epoch's: it scores that epoch's validation Jaccard again
    _, _, val = prepare_data(config, tmp_path/'run', quiet=True)
    val_ds = pipeline.make_dataset(val, 64, 4, training=False)
    scores = keras.models.load_model(tmp_path/'run'/'model.keras').evaluate(val_ds, verbose=0, return_dict=True)
    assert scores['jaccard'] == pytest.approx(history.val_jaccard.max(), abs=1e-5)


def test_template_parameters_are_the_settings_defaults():
    "The template's parameter cell holds every configuration key, with settings.ini's values (paths aside)."
    import papermill
    from beadseg.config import PROJECT_SETTINGS, load_settings
    from beadseg.runs import PARAMETERS, config_from_settings
    from beadseg.execute import TEMPLATE
    parameters = papermill.inspect_notebook(str(TEMPLATE))
    assert tuple(parameters) == (*PARAMETERS, 'epoch_budget') and parameters['epoch_budget']['default'] == '0'  # 0: no rung budget
    parameters.pop('epoch_budget')
    defaults = config_from_settings(load_settings(PROJECT_SETTINGS))
    for name, value in defaults.items():
        if name in ('dataset', 'out_dir'): continue
        assert eval(parameters[name]['default']) == value, name


def micro_config(beads, out, **overrides):
    "A tiny configuration whose epoch holds 144 crops of 32 x 32 (9 training images of 128 x 128, 16 crops each)."
    from beadseg.config import load_settings
    from beadseg.runs import config_from_settings
    return config_from_settings(load_settings(None, dict(image_size=32, base_filters=4, max_epochs=1, learning_rate=1e-3,
                                                         val_split=0.25)),
                                dataset=str(beads), batch_size=32, loss_function='focal', out_dir=str(out), **overrides)


class Passes(keras.callbacks.Callback):
    "Counts training passes and records the optimizer's accumulation; with `oom_at`, runs out of memory while whole batches of that many pass."
    def __init__(self, oom_at=None): super().__init__(); self.oom_at = oom_at
    def on_train_begin(self, logs=None): self.passes = 0
    def on_train_batch_begin(self, batch, logs=None):
        if self.oom_at and (self.model.optimizer.gradient_accumulation_steps or 1) == 1:
            raise tf.errors.ResourceExhaustedError(None, None, f'OOM when allocating a batch of {self.oom_at}')
    def on_train_batch_end(self, batch, logs=None): self.passes += 1
    def on_train_end(self, logs=None): self.steps = self.model.optimizer.gradient_accumulation_steps


@pytest.fixture(scope='module')
def beads12(tmp_path_factory):
    from beadseg.synthetic import synthesize
    return synthesize(tmp_path_factory.mktemp('data')/'beads12', n_images=12, size=128, seed=3, preset='easy')


def test_forced_micro_batches_train_an_effective_batch_of_32(beads12, tmp_path):
    from beadseg.train import train
    passes = Passes()
    result = train(micro_config(beads12, tmp_path/'run', micro_batch_size=8), callbacks=[passes], verbose=0)
    assert result['status'] == 'completed' and result['micro_batch_size'] == 8 and result['config']['batch_size'] == 32
    assert passes.steps == 4 and passes.passes == 144 // 8  # 18 passes of 8 images: 4 per update of a batch of 32


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_batch(beads12, tmp_path, capsys):
    from beadseg.train import train
    passes = Passes(oom_at=32)
    result = train(micro_config(beads12, tmp_path/'run'), callbacks=[passes], verbose=0)
    assert result['status'] == 'completed' and result['micro_batch_size'] == 16 and passes.steps == 2
    assert ('out of accelerator memory with micro-batches of 32: retrying with 16, accumulating gradients over 2 of them '
            'per batch of 32') in capsys.readouterr().out


def test_bfloat16_trains_with_finite_losses(beads12, tmp_path):
    from beadseg.train import train, history_frame
    result = train(micro_config(beads12, tmp_path/'run', mixed_precision='bfloat16', max_epochs=2), verbose=0)
    history = history_frame(tmp_path/'run')
    assert result['status'] == 'completed' and len(history) == 2
    assert history[['loss', 'val_loss']].notna().all().all() and (history.loss < 10).all()
    assert result['evaluation']['jaccard'] >= 0
    keras.mixed_precision.set_dtype_policy('float32')  # the policy is global: leave it as the other tests expect


def test_a_closed_output_pipe_stops_resumably_not_as_a_failure(beads12, tmp_path):
    "A driver killed with kill -9 leaves its configurations writing into a closed pipe: that is a stop, not a failure."
    from beadseg.train import train
    class ClosedPipe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None): raise BrokenPipeError(32, 'Broken pipe')
    result = train(micro_config(beads12, tmp_path/'run', max_epochs=2), callbacks=[ClosedPipe()], verbose=0)
    assert result['status'] == 'interrupted' and result['error'] is None
    again = train(micro_config(beads12, tmp_path/'run', max_epochs=2), verbose=0)
    assert again['status'] == 'completed' and again['epochs_run'] == 2


def test_an_error_raised_after_a_stop_signal_is_the_stop_not_a_failure(beads12, tmp_path):
    """A stop signal can reach Python inside library code, which may turn our `Interrupted` into an error of its own (a
    SIGTERM while Keras loaded the best model for evaluation ended as 'failed: TypeError' from TensorFlow's dtype code).
    Once a stop was received, the error that follows is that stop: interrupted, resumable."""
    from beadseg.train import train
    class StopThenLibraryError(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            os.kill(os.getpid(), signal.SIGTERM); raise TypeError('Cannot convert -inf to EagerTensor of dtype int32')
    result = train(micro_config(beads12, tmp_path/'run'), callbacks=[StopThenLibraryError()], verbose=0)
    assert (result['status'], result['error']) == ('interrupted', None)
    without_stop = type('LibraryError', (keras.callbacks.Callback,), dict(on_epoch_end=lambda self, epoch, logs=None: 1 / 0))
    with pytest.raises(ZeroDivisionError): train(micro_config(beads12, tmp_path/'failing'), callbacks=[without_stop()], verbose=0)
    assert json.loads((tmp_path/'failing'/'result.json').read_text())['status'] == 'failed'  # without a stop, an error is a failure


def train_until(beads, out, marker, sig, *args):
    "`beadseg train` into `out`; at the first output line holding `marker`, send `sig` to its process group. Returns (exit status, output)."
    exe = os.path.join(os.path.dirname(sys.executable), 'beadseg')
    process = subprocess.Popen([exe, 'train', '--dataset', str(beads), '--out-dir', str(out), *TINY, *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    lines = []
    for line in process.stdout:
        if marker in line and not any(marker in seen for seen in lines): os.killpg(process.pid, sig)
        lines.append(line)
    process.wait(timeout=120)
    return process.returncode, ''.join(lines)


class SignalsAt(keras.callbacks.Callback):
    "Sends this process `n` SIGTERMs after batch `batch` of epoch `epoch` (0-based), as a user pressing Ctrl-C twice."
    def __init__(self, epoch, batch, n=2): super().__init__(); self.at, self.n = (epoch, batch), n
    def on_epoch_begin(self, epoch, logs=None): self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            for _ in range(self.n): os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_finishes_the_epoch_and_the_resume_trains_as_an_unbroken_run(beads, tmp_path, monkeypatch, capsys):
    """Issue 26's repro, scaled down: one configuration (same seed, no dropout) trained undisturbed, and trained with Ctrl-C
    to `beadseg train`'s process group as epoch 2 begins, then resumed. The stopped run keeps whole epochs only (before,
    it recorded epoch 2 cut short after the batch under way: loss 0.0854 against 0.0725). The resumed run draws each
    epoch's data as the unbroken one does (before, it replayed epoch 1's order and crops: validation Jaccard 0.104 against
    0.219 in epoch 3); measured, the histories agree exactly. Two signals in the middle of the resumed run's second epoch
    stop it at once, and that epoch leaves no trace. (The same seed giving the same history is shown on the way.)"""
    from beadseg.train import train, StopOnSignal
    from beadseg.checkpoints import latest_resume_point
    settings = dict(max_epochs=5, dropout=0.0, patience=10, learning_rate=1e-3)
    whole = train(tiny_config(beads, tmp_path/'whole', **settings), verbose=0, epoch_budget=4)  # a rung: not evaluated
    code, output = train_until(beads, tmp_path/'stopped', 'Epoch 2/5', signal.SIGINT,
                               '--max-epochs', '5', '--dropout', '0', '--patience', '10')
    stopped = json.loads((tmp_path/'stopped'/'result.json').read_text())
    assert (code, stopped['status']) == (1, 'interrupted'), output[-3000:]
    assert {**stopped['config'], 'out_dir': None} == {**whole['config'], 'out_dir': None}
    history = lambda name: pd.read_csv(tmp_path/name/'history.csv').drop(columns='epoch_seconds')
    unbroken, kept = history('whole'), history('stopped')
    # epoch 2, under way when the signal came, was finished (or epoch 3, had the signal come late: a loaded machine)
    assert whole['status'] == 'paused' and 2 <= stopped['epochs_run'] == len(kept) <= 3, kept
    pd.testing.assert_frame_equal(kept, unbroken[:len(kept)])  # whole epochs: the unbroken run's
    assert 'stopping after this epoch (a second signal stops at once' in output
    # the resume trains one epoch; in the next a second signal (not the first passed on again) stops it at once
    monkeypatch.setattr(StopOnSignal, 'same_stop_s', 0)
    done = len(kept) + 1
    resumed = train(tiny_config(beads, tmp_path/'stopped', **settings), callbacks=[SignalsAt(done, 2)], verbose=0)
    assert (resumed['status'], resumed['epochs_run'], latest_resume_point(tmp_path/'stopped')[0]) == ('interrupted', done, done)
    assert 'stopping now; this epoch is discarded' in capsys.readouterr().out
    pd.testing.assert_frame_equal(history('stopped'), unbroken[:done])  # the unbroken run's crops, not epoch 1's again


def test_xla_that_cannot_compile_falls_back_once_and_says_why(beads12, tmp_path, monkeypatch, capsys):
    "No GPU needed: the fit fails as XLA does without libdevice, the first time; `train` fits again without XLA and records why."
    import beadseg.train
    from beadseg.train import train, read_result, KeepBest, StopOnNaN
    seen = []
    def fit(config, out_dir, *args):
        seen.append(config['jit_compile'])
        if len(seen) == 1: raise tf.errors.InternalError(None, None, 'Graph execution error:\n\nlibdevice not found at ./libdevice.10.bc')
        return 1000, KeepBest(out_dir, pd.DataFrame()), StopOnNaN(), 32
    monkeypatch.setattr(beadseg.train, 'fit_within_memory', fit)
    result = train(micro_config(beads12, tmp_path/'run', jit_compile='on'), verbose=0)
    reason = 'InternalError: libdevice not found at ./libdevice.10.bc'
    assert seen == ['on', 'off'] and (result['status'], result['xla_fallback']) == ('completed', reason)
    assert read_result(tmp_path/'run')['xla_fallback'] == reason and result['config']['jit_compile'] == 'on'
    assert f'XLA failed to compile ({reason}); continuing with jit_compile off' in capsys.readouterr().out
    (tmp_path/'run'/'result.json').write_text(json.dumps({**result, 'status': 'interrupted'}))  # a rerun: no XLA from the start
    train(micro_config(beads12, tmp_path/'run', jit_compile='on'), verbose=0)
    assert seen == ['on', 'off', 'off'] and read_result(tmp_path/'run')['xla_fallback'] == reason


def test_a_best_model_damaged_in_place_is_restored_on_resume(beads, tmp_path, capsys):
    """Issue 26, finding 7: the best model was one file hard-linked as model.keras and in every resume point; written over
    in place, the resume failed with "File not found: .../model.keras" although the file existed. Now model.keras is a copy,
    the manifests record each file's digest, and the resume restores the damaged file from its intact copy."""
    from beadseg.train import train
    from beadseg.checkpoints import file_digest, latest_resume_point, weights_checksum
    out = tmp_path/'run'
    paused = train(tiny_config(beads, out, max_epochs=3, patience=10), verbose=0, epoch_budget=2)
    point = latest_resume_point(out)[1]
    best = keras.models.load_model(out/'model.keras')
    with open(point/'best.keras', 'r+b') as f:  # the state's best model: every link to it is damaged at once
        f.seek(middle := (point/'best.keras').stat().st_size // 2); flipped = bytes(255 - b for b in f.read(64))
        f.seek(middle); f.write(flipped)
    assert file_digest(point/'best.keras') != file_digest(out/'model.keras')  # before: one file, both damaged
    done = train(tiny_config(beads, out, max_epochs=3, patience=10), verbose=0)
    assert (paused['status'], done['status'], done['epochs_run']) == ('paused', 'completed', 3), done.get('error')
    said = capsys.readouterr().out
    if paused['best_epoch'] == 2:  # best.keras was epoch 2's own model: that epoch is set aside and trained again, as it was
        assert 'model.keras is damaged: truncated or corrupt, not the bytes committed' in said and 'set aside as corrupt_epoch_0002_' in said, said
    else:  # an older best: restored from model.keras, and epoch 2 is kept
        assert 'best.keras was damaged; restored from its copy' in said and 'set aside' not in said, said
    if done['best_epoch'] <= 2:  # the best epoch's weights, whichever way they were recovered
        assert weights_checksum(keras.models.load_model(out/'model.keras')) == weights_checksum(best)
