"""Safe on shared clusters (issue 26): notebooks run in beadseg's own Python whatever kernelspecs the user has, job scripts
keep the user's site-packages out of the container and quote what qsub and the shell read, and the lock on a configuration's
folder works where the filesystem has no flock (Lustre without -o flock, some NFS mounts). Nothing here trains a model."""
import errno, json, os, re, signal, socket, subprocess, sys, sysconfig, threading
from pathlib import Path
import nbformat, pytest
from test_hpc import directive_lines, fake_bin, make_run, start_subjob, submit

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------------
# The kernel: beadseg's own Python

def which_python_notebook(folder):
    "A notebook (named `python3`, as beadseg's templates are) that records the interpreter its kernel runs, and whose kernel that is."
    cells = [nbformat.v4.new_code_cell('out_dir = None', metadata=dict(tags=['parameters'])),
             nbformat.v4.new_code_cell("import json, os, sys; from pathlib import Path\n"
                                       "Path(out_dir, 'python.json').write_text(json.dumps(dict(executable=sys.executable, "
                                       "kernelspec=os.environ.get('FAKE_KERNELSPEC'))))")]
    path = Path(folder)/'which.ipynb'
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=dict(
        kernelspec=dict(name='python3', display_name='Python 3', language='python'))), path)
    return path


def user_kernelspecs(folder):
    """A Jupyter data folder holding a user's own `python3` kernelspec, as JupyterHub or `ipykernel install --user` leave
    in ~/.local/share/jupyter: another interpreter (the one this virtualenv was made from, with its packages on PYTHONPATH
    so that it can start a kernel at all), marked by FAKE_KERNELSPEC. Returns the data folder."""
    data = Path(folder)/'user_jupyter'
    spec = data/'kernels'/'python3'
    spec.mkdir(parents=True)
    other = os.path.realpath(getattr(sys, '_base_executable', None) or sys.executable)
    packages = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib')))
    (spec/'python').write_text(f'#!/bin/sh\nexport FAKE_KERNELSPEC=theirs PYTHONPATH="{packages}"\n'
                               f'exec "{other}" -m ipykernel_launcher "$@"\n')
    (spec/'python').chmod(0o755)
    (spec/'kernel.json').write_text(json.dumps(dict(argv=[str(spec/'python'), '-f', '{connection_file}'],
                                                    display_name='Python 3 (theirs)', language='python')))
    return data


def put_user_kernelspecs_first(folder, monkeypatch, variable):
    """Make `user_kernelspecs(folder)` the user's Jupyter data folder (JUPYTER_DATA_DIR, ~/.local/share/jupyter) or a
    site's (JUPYTER_PATH, set by modules and JupyterHub spawners). A user's folder comes before this virtualenv's own
    share/jupyter only outside virtualenvs and conda, as for a container's system Python: JUPYTER_PREFER_ENV_PATH=0 says so."""
    monkeypatch.setenv(variable, str(user_kernelspecs(folder)))
    monkeypatch.setenv('JUPYTER_PREFER_ENV_PATH', '0')


@pytest.mark.parametrize('variable', ['JUPYTER_DATA_DIR', 'JUPYTER_PATH'])
def test_a_user_python3_kernelspec_does_not_change_the_kernel_python(tmp_path, monkeypatch, variable):
    from beadseg.runs import run_notebook, stderr_to
    put_user_kernelspecs_first(tmp_path, monkeypatch, variable)
    with stderr_to(tmp_path/'kernel.log'):
        run_notebook(which_python_notebook(tmp_path), tmp_path/'out.ipynb', parameters=dict(out_dir=str(tmp_path)),
                     progress_bar=False)
    assert json.loads((tmp_path/'python.json').read_text()) == dict(executable=sys.executable, kernelspec=None)
    assert os.environ[variable] == str(tmp_path/'user_jupyter')  # JUPYTER_PATH is as it was after the call


def test_the_training_kernel_is_beadseg_python(tmp_path, monkeypatch):
    "The path every configuration's training takes (`execute_notebook`), with a stand-in for the training template."
    from beadseg import execute
    put_user_kernelspecs_first(tmp_path, monkeypatch, 'JUPYTER_DATA_DIR')
    monkeypatch.setattr(execute, 'TEMPLATE', which_python_notebook(tmp_path))
    out_dir = tmp_path/'configs'/'x'
    out_dir.mkdir(parents=True)
    assert execute.execute_notebook(dict(out_dir=str(out_dir)), 120, None, []) is None
    assert json.loads((out_dir/'python.json').read_text()) == dict(executable=sys.executable, kernelspec=None)


KNOWN_DIRECT = set()  # every module runs its notebooks through runs.run_notebook


def test_no_new_module_calls_papermill_directly():
    "Every notebook beadseg runs goes through `runs.run_notebook`; the modules that do not yet may only shrink."
    direct = {p.name for p in (ROOT/'beadseg').glob('*.py')
              if p.name != 'runs.py' and re.search(r'\.execute_notebook\(|kernel_name=', p.read_text())}
    assert direct <= KNOWN_DIRECT, direct - KNOWN_DIRECT

# ---------------------------------------------------------------------------------------------------------------------
# Job scripts

FAKE_APPTAINER = '''#!/bin/bash
echo "PYTHONNOUSERSITE=${PYTHONNOUSERSITE:-unset} $*" >> "${FAKE_RECORD:?}.apptainer"
shift 3  # exec --nv IMAGE
exec "$@"
'''


def test_container_jobs_keep_the_user_site_out(tmp_path, monkeypatch):
    "The container's Python must not import packages from the user's ~/.local, which Apptainer mounts with $HOME."
    monkeypatch.delenv('PYTHONNOUSERSITE', raising=False)
    run = make_run(tmp_path, 2)
    fake_bin(tmp_path, apptainer=FAKE_APPTAINER)
    job, record = start_subjob(run, 'slurm', {'SLURM_ARRAY_TASK_ID': '1', 'SLURM_SUBMIT_DIR': str(tmp_path)},
                               '--container', '/images/tf 2.16.1.sif')
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    calls = Path(f'{record}.apptainer').read_text().splitlines()
    assert [c.split(' beadseg ')[0] for c in calls] == ['PYTHONNOUSERSITE=1 exec --nv /images/tf 2.16.1.sif'] * 2
    assert record.read_text().splitlines()[-1] == f'run-one {run.resolve()} --index 1'
    assert submit(tmp_path, 'slurm', '--dry-run').returncode == 0  # without a container the user's site stays
    assert 'PYTHONNOUSERSITE' not in (run/'jobs'/'array.slurm').read_text()


def qsub_words(directive:str) -> list:
    r"""The words qsub makes of the options on a `#PBS` line, as `make_argv` does in PBS Pro (openpbs src/cmds/qsub.c) and
    Torque (src/cmds/qsub_functions.c): whitespace separates; '...' and "..." group and escape nothing; \ escapes outside
    them. (A line that ends in \ is also joined to the next before that.)"""
    words, word, i = [], None, 0
    while i < len(directive):
        ch = directive[i]
        if ch in '"\'':
            end = directive.find(ch, i + 1)
            if end < 0: raise ValueError(f'qsub: unmatched {ch}')
            word, i = (word or '') + directive[i + 1:end], end + 1
        elif ch == '\\': word, i = (word or '') + directive[i + 1:i + 2], i + 2
        elif ch.isspace():
            if word is not None: words.append(word)
            word, i = None, i + 1
        else: word, i = (word or '') + ch, i + 1
    return words + ([word] if word is not None else [])


def test_qsub_words():
    assert qsub_words(' -q gpuq') == ['-q', 'gpuq']
    assert qsub_words('-q "gpu q" -A \'it"s\' a\\ b') == ['-q', 'gpu q', '-A', 'it"s', 'a b']
    with pytest.raises(ValueError, match='unmatched'): qsub_words("-A it's")


ODD_QUEUE, ODD_ACCOUNT = 'gpu q -W depend=afterok:1', "it's #7\\"  # more options smuggled in; a quote, a hash, a line joiner


@pytest.mark.parametrize('scheduler', ['pbs', 'torque'])
def test_pbs_directive_values_are_one_word_each(tmp_path, scheduler):
    run = make_run(tmp_path, 3)
    for mode in ('array', 'sequential'):
        out = submit(tmp_path, scheduler, '--dry-run', '--mode', mode, '--queue', ODD_QUEUE, '--account', ODD_ACCOUNT)
        assert out.returncode == 0, out.stderr
    for job in ('array', 'summary', 'sequential'):
        lines = directive_lines(run/'jobs'/f'{job}.{scheduler}')
        assert not any(line.endswith('\\') for line in lines), job
        words = [qsub_words(line[len('#PBS'):]) for line in lines]
        assert all(len(w) == 2 for w in words), (job, words)
        assert ['-q', ODD_QUEUE] in words and ['-A', ODD_ACCOUNT] in words, job
    assert submit(tmp_path, scheduler, '--dry-run', '--queue', 'gpuq').returncode == 0
    assert '#PBS -q gpuq' in directive_lines(run/'jobs'/f'array.{scheduler}')  # a plain value is written as before


def test_a_pbs_value_with_both_quotes_is_refused(tmp_path):
    run = make_run(tmp_path, 2)
    out = submit(tmp_path, 'pbs', '--dry-run', '--queue', 'it\'s "q"')
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert '#PBS -q' in out.stderr and 'both kinds of quote' in out.stderr
    assert not (run/'jobs'/'array.pbs').exists()


def test_the_logged_resume_command_runs_only_beadseg(tmp_path):
    "A run folder whose name holds `$(...)` and backquotes: copying the resume command from the log runs nothing else."
    folder = tmp_path/'runs $(touch pwned) `touch pwned2`'
    run = make_run(folder, 2)
    job, record = start_subjob(run, 'slurm', {'SLURM_ARRAY_TASK_ID': '1', 'SLURM_SUBMIT_DIR': str(folder), 'FAKE_FAIL': '1'})
    job.communicate(timeout=60)
    log = (run/'jobs'/'logs'/'config_1.log').read_text()
    resume = log.split('configurations continue with: ')[1].splitlines()[0]
    env = {**os.environ, 'PATH': f'{folder/"fakebin"}{os.pathsep}{os.environ["PATH"]}', 'FAKE_RECORD': str(record)}
    subprocess.run(['bash', '-c', resume], cwd=tmp_path, env=env, check=True, capture_output=True)  # as pasted in a terminal
    assert record.read_text().splitlines()[-1] == f'submit {run.resolve()} --scheduler slurm --only-unfinished'
    assert not list(tmp_path.rglob('pwned*'))

# ---------------------------------------------------------------------------------------------------------------------
# The lock on a configuration's folder, without flock

def without_flock(monkeypatch, error=errno.ENOSYS):
    "Make flock fail as on Lustre mounted without -o flock (ENOSYS) or on some NFS mounts (EOPNOTSUPP, EINVAL, ENOLCK)."
    from beadseg import runs
    def flock(f, operation): raise OSError(error, os.strerror(error))
    monkeypatch.setattr(runs.fcntl, 'flock', flock)


@pytest.fixture
def no_flock(monkeypatch): without_flock(monkeypatch)


@pytest.mark.parametrize('error', [errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOLCK], ids=errno.errorcode.get)
def test_where_flock_is_unsupported_a_lock_file_is_held(tmp_path, monkeypatch, error):
    from beadseg.runs import config_lock
    without_flock(monkeypatch, error)
    with config_lock(tmp_path): assert (tmp_path/'.lock.held').is_file()
    assert not (tmp_path/'.lock.held').exists()


def holding(out_dir, entered:threading.Event, leave:threading.Event, events:list, name:str):
    "A thread that holds `config_lock(out_dir)` until `leave` is set."
    from beadseg.runs import config_lock
    def hold():
        with config_lock(out_dir):
            events.append(f'{name} in'); entered.set(); leave.wait(10); events.append(f'{name} out')
    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


def test_without_flock_a_second_holder_waits_for_the_first(tmp_path, no_flock, capsys):
    events, entered, leave = [], [threading.Event(), threading.Event()], threading.Event()
    first = holding(tmp_path, entered[0], leave, events, 'first')
    assert entered[0].wait(10)
    held = json.loads((tmp_path/'.lock.held').read_text())
    assert (held['host'], held['pid']) == (socket.gethostname(), os.getpid())
    second = holding(tmp_path, entered[1], leave, events, 'second')
    assert not entered[1].wait(0.6)  # waits while the first holds it
    leave.set(); first.join(10); second.join(10)
    assert events == ['first in', 'first out', 'second in', 'second out']
    assert f'{tmp_path}: waiting for another process to finish with it' in capsys.readouterr().out
    assert not (tmp_path/'.lock.held').exists()  # removed when let go


HOLDER = r"""
import errno, fcntl, sys, time
from pathlib import Path
def flock(f, operation): raise OSError(errno.ENOSYS, 'Function not implemented')
fcntl.flock = flock
from beadseg.runs import config_lock
with config_lock(sys.argv[1]):
    print('held', flush=True)
    while not Path(sys.argv[2]).exists(): time.sleep(0.05)
"""


def start_holder(out_dir):
    "Another process holding `config_lock(out_dir)` without flock until out_dir/go exists."
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(out_dir), str(out_dir/'go')], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == 'held\n'
    return holder


def test_without_flock_another_process_excludes_and_its_death_frees_the_lock(tmp_path, no_flock):
    events, entered, leave = [], threading.Event(), threading.Event()
    holder = start_holder(tmp_path)
    waiter = holding(tmp_path, entered, leave, events, 'waiter')
    assert not entered.wait(0.6)  # a live process of this host holds it
    (tmp_path/'go').touch(); holder.wait(10)
    assert entered.wait(10)  # let go of: the file is gone
    leave.set(); waiter.join(10)
    # a holder killed with SIGKILL leaves its lock file behind; its pid is gone, so the next one takes the lock over
    (tmp_path/'go').unlink()
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL); holder.wait(10)
    assert json.loads((tmp_path/'.lock.held').read_text())['pid'] == holder.pid
    entered.clear(); leave.set()
    holding(tmp_path, entered, leave, events, 'after').join(10)
    assert entered.is_set() and not (tmp_path/'.lock.held').exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')]  # the stale file renamed aside is gone too


def test_without_flock_stale_locks_are_taken_over_and_other_hosts_waited_for(tmp_path, no_flock, capsys):
    from beadseg.runs import config_lock, process_stat
    lock = tmp_path/'.lock.held'
    ended = subprocess.Popen(['true']); ended.wait()
    start = process_stat(os.getpid())[1]
    for pid, started in [(ended.pid, start), (os.getpid(), str(int(start) - 1))]:  # gone; the pid of another process now
        lock.write_text(json.dumps(dict(host=socket.gethostname(), pid=pid, start=started)))
        with config_lock(tmp_path): assert json.loads(lock.read_text())['pid'] == os.getpid()
        assert not lock.exists()
    lock.write_text(json.dumps(dict(host='another-node', pid=ended.pid, start=start)))  # cannot be checked from here
    events, entered, leave = [], threading.Event(), threading.Event()
    leave.set()
    waiter = holding(tmp_path, entered, leave, events, 'waiter')
    assert not entered.wait(0.6)
    assert f'if that process is gone, delete {lock}' in capsys.readouterr().out
    lock.unlink()
    assert entered.wait(10); waiter.join(10)


def test_where_flock_works_it_is_used(tmp_path):
    from beadseg.runs import config_lock
    with config_lock(tmp_path): assert sorted(p.name for p in tmp_path.iterdir()) == ['.lock']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.lock']
