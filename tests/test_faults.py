"""Fault injection: a signal at every phase of a configuration's run, then a resume.

One configuration goes through a chain of runs of `beadseg run-one`, each stopped at a different phase (found by the
`beadseg phase: ...` lines and Keras' `Epoch N/M` lines, never by sleeping) and each the resume of the one before, so
the whole file costs about ten kernel starts. At the end the configuration must be complete with contiguous epochs,
one row in the results, and a `model.keras` whose weights are exactly those its recorded best epoch had when it was
trained (`state/epochs.jsonl` keeps each epoch's weights checksum as it was computed in memory).

Measured (CPU, 2 cores; `pytest -s` prints it), 4 epochs of 64 x 64 crops:

| phase            | signal                 | status then | exit | committed epochs | lost | resumed |
|------------------|------------------------|-------------|------|------------------|------|---------|
| kernel start     | SIGTERM to group       | interrupted | 1    | 0                | 0    | yes     |
| validating       | SIGINT to group        | interrupted | 1    | 0                | 0    | yes     |
| building         | SIGTERM to group       | interrupted | 1    | 0                | 0    | yes     |
| fitting, epoch 1 | SIGTERM to group       | interrupted | 1    | 1                | 0    | yes     |
| saving epoch 2   | SIGKILL to the kernel  | crashed     | 1    | 1                | 1 (the one being saved) | yes |
| fitting          | SIGKILL to group       | running     | -9   | 1                | 0    | yes     |
| saving epoch 3   | SIGINT to group        | interrupted | 1    | 3                | 0    | yes     |
| evaluating       | SIGTERM to group       | interrupted | 1    | 4                | 0    | yes (evaluation only) |
| writing          | SIGTERM to group       | completed   | 0    | 4                | 0    | -       |
| search, fitting  | SIGINT to driver group | interrupted | 1    | >= 2             | 0    | yes (search --resume exits 0) |
"""
import json, os, signal, subprocess, sys, threading, time
from pathlib import Path
import pandas as pd, pytest
from conftest import logged_epochs, run_beadseg, ROOT

BEADSEG = str(Path(sys.executable).parent/'beadseg')
TINY = ('--image-size', '64', '--base-filters', '8', '--batch-sizes', '4', '--learning-rate', '1e-3', '--val-split', '0.25',
        '--max-epochs', '4', '--patience', '10', '--search-type', 'grid', '--architectures', 'unet',
        '--loss-functions', 'combined,dice', '--no-progress')
TABLE = []  # (phase, signal, status, exit status, epochs kept, epochs lost): printed at the end (pytest -s)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A planned two-configuration run on 8 synthetic 64 x 64 images (one crop each: two steps an epoch)."
    work = tmp_path_factory.mktemp('faults')
    done = run_beadseg('synth', work/'beads', '--n-images', '8', '--size', '64')
    assert done.returncode == 0, done.stderr
    done = run_beadseg('search', '--plan-only', '--dataset', work/'beads', '--out', work/'runs', *TINY)
    assert done.returncode == 0, done.stderr
    return next((work/'runs').glob('hyperparam_comprehensive_*'))


def kernel_pid(out):
    return json.loads((out/'kernel.pid').read_text())['pid']


def run_one(run_dir, index=0, marker=None, sig=None, target='group', before=lambda: None, timeout=300):
    "Run `beadseg run-one`; when a line contains `marker`, send `sig` to its process group (or to its kernel). Returns (exit status, output)."
    process = subprocess.Popen([BEADSEG, 'run-one', str(run_dir), '--index', str(index)], cwd=ROOT, text=True, bufsize=1,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    lines, sent = [], False
    try:
        for line in process.stdout:
            lines.append(line)
            if marker and not sent and marker in line:
                before()
                if target == 'kernel': os.kill(kernel_pid(configs(run_dir)[index]), sig)
                else: os.killpg(process.pid, sig)
                sent = True
        process.wait()
    finally: watchdog.cancel()
    wait_for_kernel_exit(run_dir, index)
    output = ''.join(lines)
    assert not marker or sent, f'never saw {marker!r}:\n{output[-3000:]}'
    assert 'Traceback' not in output, output[-3000:]
    return process.returncode, output


def wait_for_kernel_exit(run_dir, index, timeout=30):
    "Wait until the configuration's kernel has exited (an orphan exits within a second or so of its parent's death)."
    try: pid = kernel_pid(configs(run_dir)[index])
    except (OSError, ValueError, IndexError): return
    end = time.time() + timeout
    while Path(f'/proc/{pid}').exists() and time.time() < end: time.sleep(0.1)


def configs(run_dir): return sorted((Path(run_dir)/'configs').iterdir())


def result(out): return json.loads((out/'result.json').read_text())


def committed(out):
    "The newest committed epoch of `out`."
    from beadseg.checkpoints import latest_resume_point
    return latest_resume_point(out)[0]


def record(phase, sig, out, code, before_epochs, expect_status, expect_code):
    "Check and tabulate one fault: its status, exit status and how many committed epochs it lost."
    r, now = result(out), committed(out)
    assert not (out/'stop').exists()  # a stop request ends with its run: a rerun by hand must not stop at once
    TABLE.append((phase, sig, r['status'], code, now, max(before_epochs - now, 0)))
    assert (r['status'], code) == (expect_status, expect_code), (phase, sig, r.get('error'))
    return now


def weights_of(path):
    import keras
    from beadseg.checkpoints import weights_checksum
    return weights_checksum(keras.models.load_model(path, compile=False))


def test_a_signal_at_every_phase_is_resumable_and_the_best_model_stays_consistent(run):
    # a stale kernel.pid naming an unrelated process: nothing may be sent to it
    bystander = subprocess.Popen(['sleep', '600'])
    out = Path(run)/'configs'/pd.read_csv(run/'plan.csv').config_id[0]
    out.mkdir(parents=True)
    (out/'kernel.pid').write_text(json.dumps(dict(pid=bystander.pid, start=None)))
    try:
        code, text = run_one(run, marker='beadseg phase: starting kernel', sig=signal.SIGTERM)
        assert bystander.poll() is None, 'the stale kernel.pid was signalled'
    finally: bystander.kill()
    record('kernel start', 'SIGTERM', out, code, 0, 'interrupted', 1)
    code, _ = run_one(run, marker='beadseg phase: validating', sig=signal.SIGINT)
    record('validating', 'SIGINT', out, code, 0, 'interrupted', 1)
    code, _ = run_one(run, marker='beadseg phase: building', sig=signal.SIGTERM)
    record('building', 'SIGTERM', out, code, 0, 'interrupted', 1)
    # in fit, the epoch under way finishes and is saved
    code, _ = run_one(run, marker='Epoch 1/4', sig=signal.SIGTERM)
    kept = record('fitting (epoch 1)', 'SIGTERM', out, code, 0, 'interrupted', 1)
    assert kept == 1
    # the kernel killed outright (as the OOM killer does) while epoch 2 is being committed: crashed, retried on the next run
    code, text = run_one(run, marker='beadseg phase: saving epoch 2', sig=signal.SIGKILL, target='kernel')
    kept = record('saving epoch 2', 'SIGKILL kernel', out, code, 2, 'crashed', 1)
    assert result(out)['crashes'] == 1 and 'kernel died' in result(out)['error']
    # everything killed outright in the middle of an epoch: the result still says running; the next run resumes
    code, text = run_one(run, marker=f'Epoch {kept + 1}/4', sig=signal.SIGKILL)
    assert code == -signal.SIGKILL and result(out)['status'] == 'running'
    TABLE.append(('fitting', 'SIGKILL group', 'running', code, committed(out), 0))
    # Ctrl-C in fit: the current epoch finishes, then the run stops like SIGTERM
    code, text = run_one(run, marker='beadseg phase: saving epoch 3', sig=signal.SIGINT)
    assert f'Resuming after epoch {kept}.' in text
    kept = record('saving epoch 3', 'SIGINT', out, code, 3, 'interrupted', 1)
    assert kept == 3
    # a truncated resume point: set aside with a warning, training continues from the one before
    newest = out/'state'/'epoch_0003'/'model.keras'
    newest.write_bytes(newest.read_bytes()[:1000])
    code, text = run_one(run, marker='beadseg phase: evaluating', sig=signal.SIGTERM)
    assert 'epoch_0003/model.keras is damaged: truncated or corrupt, not the bytes committed (1000 bytes)' in text
    assert 'Resuming after epoch 2.' in text
    assert 'File not found' not in text  # what Keras says about a truncated file
    kept = record('evaluating', 'SIGTERM', out, code, 4, 'interrupted', 1)
    assert kept == 4
    # the work is done when the result is being written: the signal costs nothing
    code, text = run_one(run, marker='beadseg phase: writing', sig=signal.SIGTERM)
    assert 'Epoch ' not in text  # nothing was trained again: the rerun only evaluated
    record('writing', 'SIGTERM', out, code, 4, 'completed', 0)
    # the end state: every epoch once, in order; model.keras is the recorded best epoch's model as it was trained
    final = result(out)
    history = pd.read_csv(out/'history.csv')
    assert list(history.epoch) == [1, 2, 3, 4] and final['epochs_run'] == 4
    assert final['best_epoch'] == history.val_jaccard.idxmax() + 1
    trained = {}
    for line in (out/'state'/'epochs.jsonl').read_text().splitlines():  # a rerun epoch replaces its first attempt
        entry = json.loads(line); trained[entry['epoch']] = entry['weights']
    assert sorted(trained) == [1, 2, 3, 4]
    assert weights_of(out/'model.keras') == trained[final['best_epoch']]
    assert not list(out.glob('.*.tmp*')) and not list((out/'state').glob('.*tmp'))
    print('\nphase x signal -> status, exit status, committed epochs after, epochs lost')
    for row in TABLE: print(' | '.join(map(str, row)))


def wait_for_log_line(path, text, process, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and text in path.read_text(): return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise TimeoutError(f'{text!r} never appeared in {path}')


def test_ctrl_c_stops_the_search_cleanly_and_a_resume_completes_it(run):
    "Depends on the test above having completed configuration 0. Ctrl-C (SIGINT to the driver's process group, as a terminal sends it)."
    driver = subprocess.Popen([BEADSEG, 'search', '--resume', str(run), '--no-progress'], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_log_line(run/'search.log', '] Epoch 2/4', driver)
    os.killpg(driver.pid, signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=300)
    second = configs(run)[1]
    assert driver.returncode == 1 and result(second)['status'] == 'interrupted', stdout + stderr
    kept = committed(second)  # the epoch under way was finished and kept
    assert kept >= 2 and result(second)['epochs_run'] == kept and logged_epochs(second/'history.csv') == kept
    assert 'Traceback' not in (run/'search.log').read_text() + stderr and 'KeyboardInterrupt' not in (run/'search.log').read_text()
    done = run_beadseg('search', '--resume', run, '--no-progress', timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = pd.read_csv(run/'search_results_final.csv', keep_default_na=False)
    assert len(table) == 2 and table.config_id.is_unique and set(table.status) == {'completed'}
    best = json.loads((run/'best_hyperparameters.json').read_text())
    assert best['config_id'] == table.config_id[0] and best['best_val_jaccard'] == pytest.approx(table.best_val_jacard[0])
    assert best['best_epoch'] == table.best_epoch[0]
    second = configs(run)[1]
    assert list(pd.read_csv(second/'history.csv').epoch) == [1, 2, 3, 4]
    log = (run/'search.log').read_text()
    assert 'Traceback' not in log and 'resume 001_' in log
    # several collects at once (a user's beside the summary job's) all succeed and agree
    collects = [subprocess.Popen([BEADSEG, 'collect', str(run)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    for c in collects:
        stdout, stderr = c.communicate(timeout=120)
        assert c.returncode == 0 and 'Traceback' not in stderr, stderr
    assert pd.read_csv(run/'search_results_final.csv', keep_default_na=False).equals(table)


def fake_run(tmp_path, statuses):
    "A planned run whose configurations have the given statuses, without training anything."
    from beadseg.config import PROJECT_SETTINGS, load_settings
    from beadseg.plan import create_run
    from beadseg.runs import config_for, write_json
    settings = load_settings(PROJECT_SETTINGS, dict(search_type='grid', architectures='unet', batch_sizes='4',
                                                    loss_functions=','.join(['dice', 'focal', 'tversky'][:len(statuses)])))
    run = create_run(settings, tmp_path/'runs')
    for i, status in enumerate(statuses):
        config = config_for(run, i)
        Path(config['out_dir']).mkdir(parents=True)
        write_json(Path(config['out_dir'])/'result.json', dict(config=config, status=status, best_val_jaccard=None, error='x'))
    return run


def test_exit_statuses_are_honest(tmp_path):
    "run-one exits 1 for failed and diverged configurations; a search in which every configuration diverged exits 1."
    run = fake_run(tmp_path, ['nan', 'failed'])
    for index in (0, 1):
        done = run_beadseg('run-one', run, '--index', index)
        assert done.returncode == 1 and 'already done' in done.stdout, done.stdout + done.stderr
    diverged = fake_run(tmp_path/'b', ['nan', 'nan'])
    done = run_beadseg('search', '--resume', diverged, '--no-progress')
    assert done.returncode == 1 and '2 nan' in done.stdout and 'did not finish with a score' in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_crashes_are_retried_up_to_the_limit_then_failed(tmp_path):
    from nbclient.exceptions import DeadKernelError
    from beadseg.execute import after_failure
    from beadseg.runs import indices_to_run, is_finished
    dead, result = DeadKernelError('Kernel died'), {'status': 'running'}
    for n in (1, 2):
        result = after_failure(result, dead, 'the kernel died', stopped=False, retries=2)
        assert (result['status'], result['crashes']) == ('crashed', n)
    result = after_failure(result, dead, 'the kernel died', stopped=False, retries=2)
    assert result['status'] == 'failed' and 'crashed 3 times' in result['error']
    # a signal that killed the kernel is a stop, not a crash; a finished result is kept
    assert after_failure({'status': 'running'}, dead, 'x', stopped=True, retries=2)['status'] == 'interrupted'
    assert after_failure({'status': 'completed'}, dead, 'x', stopped=False, retries=2)['status'] == 'completed'
    run = fake_run(tmp_path, ['crashed', 'failed', 'interrupted'])
    assert indices_to_run(run) == [0, 2] and indices_to_run(run, retry_failed=True) == [0, 1, 2]


def test_only_our_own_kernel_is_ever_signalled(tmp_path):
    "kernel.pid is trusted only when it names a child of ours with the start time it recorded: no stranger, no reused pid."
    from beadseg.runs import our_kernel, process_stat
    child = subprocess.Popen(['sleep', '60'])
    stranger = int(subprocess.run(['sh', '-c', 'sleep 60 >/dev/null 2>&1 & echo $!'], capture_output=True, text=True).stdout)
    write = lambda pid, start: (tmp_path/'kernel.pid').write_text(json.dumps(dict(pid=pid, start=start)))
    try:
        write(child.pid, process_stat(child.pid)[1]); assert our_kernel(tmp_path) == child.pid
        write(child.pid, '1'); assert our_kernel(tmp_path) is None  # the pid now belongs to another process
        write(stranger, process_stat(stranger)[1]); assert our_kernel(tmp_path) is None  # not our child
    finally:
        child.kill(); child.wait(); os.kill(stranger, signal.SIGKILL)
    (tmp_path/'kernel.pid').write_text('garbage')
    assert our_kernel(tmp_path) is None


def test_collect_drops_a_stale_best_when_nothing_is_scored(tmp_path):
    import shutil
    from beadseg.search import collect
    from beadseg.runs import write_json, config_for
    run = fake_run(tmp_path, ['running'])
    (run/'best_hyperparameters.json').write_text('{"config_id": "stale"}')
    shutil.rmtree(run/'configs')
    table = collect(run)
    assert list(table.status) == ['pending'] and not (run/'best_hyperparameters.json').exists()


def test_a_failed_configuration_with_a_score_is_listed_but_never_wins(tmp_path):
    "Its evaluation failed after training: the table shows its score and status after the scored ones; the best is a scored one."
    from beadseg.runs import read_result, write_json
    run = fake_run(tmp_path, ['completed', 'failed', 'pruned'])
    for config, score in zip(sorted((run/'configs').iterdir()), [0.6, 0.9, 0.5]):  # the failed one has the highest score
        write_json(config/'result.json', {**read_result(config), 'best_val_jaccard': score, 'best_epoch': 3})
    done = run_beadseg('collect', run)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(run/'search_results_final.csv')
    assert table.status.tolist() == ['completed', 'pruned', 'failed'] and table.best_val_jacard.tolist() == [0.6, 0.5, 0.9]
    best = json.loads((run/'best_hyperparameters.json').read_text())
    assert best['config_id'] == table.config_id[0] and best['best_val_jaccard'] == 0.6
    assert 'best 000_unet_bs4_dice with validation Jaccard 0.6000' in done.stdout


def test_report_renders_empty_and_partial_histories(tmp_path):
    "A run caught mid-write: histories empty, header-only and cut mid-line. `beadseg report` renders it, no traceback."
    from test_report import make_run as make_report_run, config
    from beadseg.report import load_run
    configs = [config('unet', 8, 'focal', 0.61), config('unet', 8, 'dice', 0.55), config('unet', 16, 'focal', 0.5),
               config('unet', 16, 'dice', 0.4, status='running'), config('unet', 32, 'dice', status='pending')]
    run = make_report_run(tmp_path/'hyperparam_comprehensive_20260101_000000', configs)
    ids = sorted(p.name for p in (run/'configs').iterdir())
    (run/'configs'/ids[0]/'history.csv').write_text('')
    (run/'configs'/ids[1]/'history.csv').write_text('epoch,loss,val_loss,jaccard,val_jaccard,dice,val_dice,learning_rate,epoch_seconds\n')
    text = (run/'configs'/ids[2]/'history.csv').read_text()
    (run/'configs'/ids[2]/'history.csv').write_text(text[:text.rindex('\n', 0, -1) + 12])  # the last row cut short
    (run/'configs'/ids[3]/'history.csv').write_text('')
    loaded = load_run(run)
    assert loaded.history(ids[0]) is None and loaded.history(ids[1]) is None and loaded.history(ids[3]) is None
    assert list(loaded.history(ids[2]).epoch) == list(range(1, 50))  # the complete rows
    out = run_beadseg('report', run, '--out', tmp_path/'reports', timeout=600)
    assert out.returncode == 0 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    assert (tmp_path/'reports'/f'{run.name}.html').is_file()


FLAKY_KERNEL = """import os, sys
if 'ipykernel_launcher' in sys.orig_argv:  # only the kernels papermill starts, not beadseg itself
    counter = os.environ['FLAKY_KERNEL_STARTS']
    starts = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, 'w').write(str(starts + 1))
    if starts < int(os.environ['FLAKY_KERNEL_FAILS']):
        sys.stderr.write('zmq.error.ZMQError: Address already in use\\n'); sys.stderr.flush(); os._exit(1)
"""


def flaky_kernel(folder, fails):
    "An environment whose Python kernels die at start `fails` times (as one that lost its port to another kernel does), then start."
    folder.mkdir(parents=True)
    (folder/'sitecustomize.py').write_text(FLAKY_KERNEL)  # beadseg's own kernelspec runs this Python: no kernelspec to swap
    counter = folder/'starts'
    return {'PYTHONPATH': str(folder), 'FLAKY_KERNEL_STARTS': str(counter), 'FLAKY_KERNEL_FAILS': str(fails)}, counter


def test_a_kernel_that_does_not_start_is_started_again(tmp_path):
    "A kernel that dies before running a cell is started again (up to 3 tries); one that never starts is a one-line failure."
    assert run_beadseg('synth', tmp_path/'beads', '--n-images', '8', '--size', '64').returncode == 0
    done = run_beadseg('search', '--plan-only', '--dataset', tmp_path/'beads', '--out', tmp_path/'runs', *TINY,
                       '--max-epochs', '1', '--loss-functions', 'dice')  # the later flag wins: one configuration, one epoch
    assert done.returncode == 0, done.stderr
    [run] = (tmp_path/'runs').iterdir()
    env, starts = flaky_kernel(tmp_path/'never', fails=99)
    done = run_beadseg('run-one', run, '--index', 0, env=env)
    [out] = configs(run)
    assert done.returncode == 1 and starts.read_text().strip() == '3', done.stdout + done.stderr
    assert [l for l in done.stdout.splitlines() if 'starting it again' in l][-1].endswith('(3 of 3)'), done.stdout
    assert result(out)['status'] == 'failed' and result(out)['error'].startswith('the kernel did not start in 3 tries: '), result(out)
    assert 'Traceback' not in done.stdout + done.stderr and 'Address already in use' in (out/'kernel.log').read_text()
    env, starts = flaky_kernel(tmp_path/'once', fails=1)
    done = run_beadseg('run-one', run, '--index', 0, '--retry-failed', env=env)
    assert done.returncode == 0 and starts.read_text().strip() == '2', done.stdout + done.stderr
    assert done.stdout.count('starting it again') == 1 and result(out)['status'] == 'completed', done.stdout
