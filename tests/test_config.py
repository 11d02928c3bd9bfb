"settings.ini: the seed's defaults, validation with one-line errors naming file and key, overrides, snapshots."
import re
import pytest
from beadseg.config import (SCHEMA, SettingsError, read_settings, load_settings, write_settings, find_settings,
                            PROJECT_SETTINGS)
from conftest import edited_settings


def test_project_settings_hold_the_seed_defaults():
    s = read_settings(PROJECT_SETTINGS)
    assert s['data'] == dict(dataset='dataset_shrunk_masks', test_dataset='', mask_suffix='', color='gray', shrink=2, channel=None, pixel_size=None, image_size=512,
                             val_split=0.15, seed=42, augment=True)
    assert s['train'] == dict(learning_rate=5e-5, patience=30, max_epochs=200, dropout=0.3, base_filters=64, micro_batch_size=0,
                              mixed_precision='auto', jit_compile='auto', tensorboard=True)
    assert s['search'] == dict(search_type='random', architectures=['unet', 'resunet', 'attention_resunet'],
                               batch_sizes=[8, 16, 32], loss_functions=['focal', 'combined', 'focal_tversky', 'combined_tversky'],
                               n_random=30, workers=1, timeout=0, retries=2, eta=3, min_epochs=30, repeats=1)
    assert s['pbs'] == dict(queue='', walltime='48:00:00', array_walltime='12:00:00', ncpus=36, ngpus=1, mem='240gb')
    assert s['slurm']['time'] == '48:00:00' and s['slurm']['gres'] == 'gpu:1'
    assert s['cluster'] == dict(modules='', activate='', container='', account='', array_limit=0)
    assert s['space'] == {}  # no [space] section: the seed's search


def test_a_space_section_is_optional_read_and_written_back(tmp_path):
    path = tmp_path/'settings.ini'
    path.write_text(PROJECT_SETTINGS.read_text() + '\n[space]\nimage_size = 256, 512\nlearning_rate = loguniform(1e-5, 1e-3)\n')
    s = read_settings(path)
    assert s['space']['image_size'] == [256, 512] and str(s['space']['learning_rate']) == 'loguniform(1e-05,0.001)'
    assert read_settings(write_settings(s, tmp_path/'snapshot.ini')) == s
    seed = read_settings(PROJECT_SETTINGS)
    assert '[space]' not in write_settings(seed, tmp_path/'seed.ini').read_text()  # a seed run's snapshot is as before
    path.write_text(PROJECT_SETTINGS.read_text() + '\n[space]\nepochs = 5\n')
    with pytest.raises(SettingsError, match=r"\[space\] epochs = '5': unknown key 'epochs'"): read_settings(path)


@pytest.mark.parametrize('old, new, message', [
    ('image_size = 512', 'image_size = 512px', "[data] image_size = '512px': expected a positive integer"),
    ('learning_rate = 5e-5', 'learning_rate = fast', "[train] learning_rate = 'fast': expected a positive number"),
    ('dropout = 0.3', 'dropout = 1.5', "[train] dropout = '1.5': expected a number in [0, 1)"),
    ('batch_sizes = 8, 16, 32', 'batch_sizes = 8, sixteen', "[search] batch_sizes = '8, sixteen': 'sixteen': expected a positive integer"),
    ('resunet, attention_resunet', 'resunet, transunet', "[search] architectures = 'unet, resunet, transunet': 'transunet': expected one of unet, resunet, attention_resunet"),
    ('focal, combined,', 'focal, lovasz,', "[search] loss_functions = 'focal, lovasz, focal_tversky, combined_tversky': 'lovasz': expected one of dice, focal"),
    ('mem = 240gb', 'mem = lots', "[pbs] mem = 'lots': expected a size such as 240gb"),
    ('[pbs]', '[pbss]', 'unknown section [pbss] (expected data, train, search, cluster, pbs, slurm and optionally space)'),
    ('patience = 30', 'patiance = 30', "[train] unknown key 'patiance'"),
    ('n_random = 30', '', "[search] missing key 'n_random'"),
    ('augment = true', 'augment = sometimes', "[data] augment = 'sometimes': expected true or false"),
    ('jit_compile = auto', 'jit_compile = always', "[train] jit_compile = 'always': expected one of auto, on, off"),
    ('array_time = 12:00:00', 'array_time = 2 days', "[slurm] array_time = '2 days': expected a time limit [D-]HH:MM:SS"),
    ('learning_rate = 5e-5', 'learning_rate = inf', "[train] learning_rate = 'inf': expected a finite number"),
    ('learning_rate = 5e-5', 'learning_rate = 1e400', "[train] learning_rate = '1e400': expected a finite number"),
    ('dropout = 0.3', 'dropout = nan', "[train] dropout = 'nan': expected a finite number"),
    ('seed = 42', 'seed = -1', "[data] seed = '-1': expected an integer from 0 to 4294967295"),
    ('retries = 2', 'retries = -1', "[search] retries = '-1': expected an integer >= 0"),
    # an INI continuation line makes a two-line value, which would reach a job script as a line of shell
    ('account =', 'account = proj\n  --wrap=evil', "[cluster] account = 'proj\\n--wrap=evil': contains a control character"),
    ('queue =', 'queue = workq\n  cd /', "[pbs] queue = 'workq\\ncd /': contains a control character"),
])
def test_malformed_settings_name_file_and_key(tmp_path, old, new, message):
    path = edited_settings(tmp_path, old, new)
    with pytest.raises(SettingsError) as err:
        read_settings(path)
    assert str(err.value).startswith(f'{path}: {message}')
    assert '\n' not in str(err.value)


def test_missing_section(tmp_path):
    train = re.search(r'\[train\][^[]*', PROJECT_SETTINGS.read_text()).group()
    path = edited_settings(tmp_path, train, '')
    with pytest.raises(SettingsError, match=re.escape(f'{path}: missing section [train]')):
        read_settings(path)


def test_not_an_ini_file(tmp_path):
    path = tmp_path/'settings.ini'
    path.write_text('image_size = 512\n')
    with pytest.raises(SettingsError, match='not a valid INI file: File contains no section headers'):
        read_settings(path)


def test_overrides_are_parsed_like_the_file():
    s = load_settings(PROJECT_SETTINGS, dict(image_size='128', max_epochs=5, batch_sizes='8,16', architectures=['unet']))
    assert (s['data']['image_size'], s['train']['max_epochs']) == (128, 5)
    assert s['search']['batch_sizes'] == [8, 16] and s['search']['architectures'] == ['unet']
    with pytest.raises(SettingsError, match=r"^--learning-rate = '-1': expected a positive number$"):
        load_settings(PROJECT_SETTINGS, dict(learning_rate='-1'))
    with pytest.raises(SettingsError, match=r"^--learning-rate = 'inf': expected a finite number"):
        load_settings(PROJECT_SETTINGS, dict(learning_rate='inf'))
    with pytest.raises(SettingsError, match=r"^--seed = '-3': expected an integer from 0"):
        load_settings(PROJECT_SETTINGS, dict(seed=-3))
    with pytest.raises(SettingsError, match=r"^--account = 'a\\nb': contains a control character"):
        load_settings(PROJECT_SETTINGS, dict(account='a\nb'))


def test_a_run_made_before_retries_existed_reads_with_the_default(tmp_path):
    path = edited_settings(tmp_path, 'retries = 2', '')
    assert read_settings(path)['search']['retries'] == 2


def test_snapshot_round_trip(tmp_path):
    s = load_settings(PROJECT_SETTINGS, dict(loss_functions='dice,tversky', container='/images/tf.sif'))
    assert read_settings(write_settings(s, tmp_path/'snapshot.ini')) == s


def test_find_settings_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('BEADSEG_SETTINGS', raising=False)
    assert find_settings() == PROJECT_SETTINGS  # no ./settings.ini: the project's
    (tmp_path/'settings.ini').write_text(PROJECT_SETTINGS.read_text())
    assert find_settings().resolve() == (tmp_path/'settings.ini').resolve()
    other = tmp_path/'other.ini'
    other.write_text(PROJECT_SETTINGS.read_text())
    monkeypatch.setenv('BEADSEG_SETTINGS', str(other))
    assert find_settings() == other
    with pytest.raises(SettingsError, match='missing.ini: settings file not found'):
        find_settings(tmp_path/'missing.ini')


def test_every_key_is_a_unique_flag():
    keys = [k for section in SCHEMA.values() for k in section]
    assert len(keys) == len(set(keys))


def test_halving_settings_are_checked_and_an_older_run_gets_their_defaults(tmp_path):
    s = load_settings(overrides=dict(search_type='halving', eta='2', min_epochs='10'))['search']
    assert (s['search_type'], s['eta'], s['min_epochs']) == ('halving', 2, 10)
    for key, value, says in [('eta', '1', "--eta = '1': expected an integer >= 2"),
                             ('min_epochs', '0', "--min-epochs = '0': expected a positive integer"),
                             ('search_type', 'hyperband', "--search-type = 'hyperband': expected one of random, grid, halving")]:
        with pytest.raises(SettingsError) as err: load_settings(overrides={key: value})
        assert str(err.value) == says
    older = tmp_path/'settings.ini'  # a run made before halving existed has neither key
    older.write_text(re.sub(r'^(eta|min_epochs) = .*\n', '', PROJECT_SETTINGS.read_text(), flags=re.M))
    assert (read_settings(older)['search']['eta'], read_settings(older)['search']['min_epochs']) == (3, 30)


def test_repeats_are_checked_and_default_to_one(tmp_path):
    assert load_settings(overrides=dict(repeats='3'))['search']['repeats'] == 3
    with pytest.raises(SettingsError) as err: load_settings(overrides=dict(repeats='0'))
    assert str(err.value) == "--repeats = '0': expected a positive integer"
    older = tmp_path/'settings.ini'  # a run made before repeats existed: each configuration once
    older.write_text(re.sub(r'^repeats = .*\n', '', PROJECT_SETTINGS.read_text(), flags=re.M))
    assert read_settings(older)['search']['repeats'] == 1
