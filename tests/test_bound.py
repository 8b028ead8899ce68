"""The attacker-independent bound (dFIL): its estimates, what it promises, and where the tool reports it."""
import csv
import json
import math

import pytest
import torch

from conftest import main_in, tiny_config
from recon_attack import attacks, bound as fisher
from recon_attack.attacks import build_attack
from recon_attack.bound import (DB, NO_NOISE, Bound, calibrated_variance, device_half, exact_trace,
                                hutchinson_trace, leakage)
from recon_attack import cut
from recon_attack.data import load_splits
from recon_attack.noise import generators_for
from recon_attack.prior import prior_fisher
from recon_attack.utils import provenance

CPU = torch.device('cpu')
SIGMA = 0.1


def linear_half(weight):
    """A device half that is the fixed matrix `weight` on the flattened image."""
    return lambda images: images.flatten(1) @ weight.T


def test_on_a_linear_half_dfil_is_the_frobenius_norm_and_hutchinson_converges_to_it():
    torch.manual_seed(0)
    shape, d = (3, 4, 4), 48
    weight = torch.randn(20, d, dtype=torch.float64)
    half = linear_half(weight)
    image = torch.rand(*shape, dtype=torch.float64)
    exact = exact_trace(half, image).item()
    assert exact == pytest.approx(weight.pow(2).sum().item(), rel=1e-12)
    assert leakage(torch.tensor(exact, dtype=torch.float64), d, SIGMA ** 2)['dfil'].item() == pytest.approx(
        weight.pow(2).sum().item() / (d * SIGMA ** 2), rel=1e-12)
    errors = []
    for probes in (16, 256):
        estimate, error = hutchinson_trace(half, image.repeat(8, 1, 1, 1), probes,
                                           generators_for('bound probes', range(8)))
        assert (estimate - exact).abs().max() <= 4 * error.max()  # within its reported error, on every image
        errors.append(error.mean().item())
    assert errors[1] < errors[0] / 3  # the error falls as 1 / sqrt(probes)


def test_exact_and_hutchinson_agree_on_a_resnet_cut_at_16_pixels():
    victim = cut('resnet18', 'layer1')
    half = victim.encode
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    estimate, error = hutchinson_trace(half, images, 64, generators_for('bound probes', range(2)))
    for image, mean, se in zip(images, estimate, error):
        exact = exact_trace(half, image)
        assert abs(mean - exact) <= 4 * se
        assert se / exact < 0.05
    assert all(not p.requires_grad for p in victim.parameters())


def test_no_unbiased_attacker_beats_the_bound_on_a_linear_half():
    """Least-squares inversion is unbiased: its per-pixel MSE over many noise draws is at least 1 / dFIL, and
    equal to it where W is a scaled orthogonal matrix (all its singular values alike)."""
    torch.manual_seed(0)
    d, draws = 48, 4000
    image = torch.rand(d, dtype=torch.float64)
    orthogonal = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    spread = orthogonal @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64)) @ orthogonal.T
    for weight, tight in ((3 * orthogonal, True), (spread, False)):
        bound = leakage(weight.pow(2).sum(), d, SIGMA ** 2)['mse_bound'].item()
        sent = weight @ image + SIGMA * torch.randn(draws, d, dtype=torch.float64)
        recovered = torch.linalg.solve(weight, sent.T).T
        mse = (recovered - image).pow(2).mean().item()
        assert mse >= bound * 0.97  # the sampling error of 4000 draws is about 1 %
        if tight:
            assert mse == pytest.approx(bound, rel=0.03)
        else:
            assert mse > bound * 1.2  # a spread of singular values leaves the bound loose


def test_scaling_the_tensor_with_its_noise_leaves_dfil_alone_and_channels_not_sent_lower_it(tmp_path):
    victim = cut('resnet18', 'layer1')
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    trace = exact_trace(victim.encode, image)
    scaled = exact_trace(lambda x: 5 * victim.encode(x), image)
    assert leakage(scaled, image.numel(), (5 * SIGMA) ** 2)['dfil'].item() == pytest.approx(
        leakage(trace, image.numel(), SIGMA ** 2)['dfil'].item(), rel=1e-5)
    attack, _ = build_attack(tiny_config(tmp_path, split='layer1', keep_channels=0.25, channel_select='first',
                                         image_size=16), CPU, torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    kept = exact_trace(device_half(attack), image)
    assert kept < trace
    assert kept.item() == pytest.approx(exact_trace(lambda x: victim.encode(x)[:, :16], image).item(), rel=1e-5)


def test_each_images_bound_does_not_depend_on_its_batch(tmp_path):
    cfg = tiny_config(tmp_path, **{'test_noise': True, 'noise_at': 'features', 'test_noise_var': 0.5})
    attack, _ = build_attack(cfg, CPU)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise, probes = cfg.noise.testing(), cfg.noise.probes
    whole = Bound(attack, noise, probes)(images, None, range(4))
    halves = [Bound(attack, noise, probes)(images[:2], None, range(2)),
              Bound(attack, noise, probes)(images[2:], None, range(2, 4))]
    for key in whole:
        assert torch.allclose(whole[key], torch.cat([h[key] for h in halves]))
    assert torch.allclose(whole['psnr_ceiling'], DB * torch.log(whole['dfil']))
    assert torch.allclose(whole['mse_bound'], 10 ** (-whole['psnr_ceiling'] / 10), rtol=1e-4)
    input_noise = Bound(attack, noise._replace(at='input'), probes)(images, None, range(4))
    assert torch.allclose(input_noise['mse_bound'], torch.full((4,), 0.5))  # data processing: sigma^2 itself


def exact_traces(half, images):
    """tr(J^T J) of each image from its whole Jacobian by reverse mode: independent of the bound's forward-mode
    estimator."""
    return torch.stack([torch.autograd.functional.jacobian(half, image[None], vectorize=True).pow(2).sum()
                        for image in images])


@pytest.mark.parametrize('quantile', [None, 0.9])
def test_noise_for_a_bound_sets_the_mean_or_the_quantile_of_the_exact_ceilings(tmp_path, quantile):
    """Checked against each image's exact ceiling: calibrated to the mean, the images' mean ceiling is the target
    and about half lie above it; to a quantile q, a share q of them lie at or below it."""
    attack, _ = build_attack(tiny_config(tmp_path, split='layer1', image_size=16), CPU)
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    variance, record = calibrated_variance(attack, images, 20.0, 64, quantile)
    ceilings = leakage(exact_traces(device_half(attack), images), images[0].numel(), variance)['psnr_ceiling']
    below = (ceilings <= 20.0).float().mean().item()
    if quantile is None:
        assert ceilings.mean().item() == pytest.approx(20.0, abs=0.2)  # Hutchinson's error at 64 probes
        assert 0.2 <= below <= 0.8 and 'mean' in record['meaning']
    else:
        assert below >= 0.8 and ceilings.mean().item() < 19.9
        assert 'a share 0.9 of 10 calibration images' in record['meaning']
    assert record['sigma'] == pytest.approx(math.sqrt(variance))


def test_defences_after_the_noise_keep_the_bound_and_a_narrow_tensor_is_singular(tmp_path):
    """Dropout on the noisy tensor is processing of what was received: the bound stands, from the same Fisher
    information. A tensor with fewer values than the image has a singular Fisher information: no unbiased attacker."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    noisy = {'test_noise': True, 'noise_at': 'features', 'test_noise_var': 0.5}
    found = {}
    for name, flags in (('plain', {'split': 'layer1'}), ('dropout', {'split': 'layer1', 'defence': 'dropout'}),
                        ('narrow', {'split': 'layer2'})):
        cfg = tiny_config(tmp_path, **noisy, **flags)
        attack, _ = build_attack(cfg, CPU)
        bound = Bound(attack, cfg.noise.testing(), 4)
        sent = attack.send(images)
        found[name] = (bound, bound(images, sent, range(2)))
    assert found['dropout'][0].missing is None
    assert torch.equal(found['dropout'][1]['dfil'], found['plain'][1]['dfil'])
    assert found['plain'][0].singular is None and found['dropout'][0].singular is None
    assert found['narrow'][0].singular.startswith('the Fisher information is singular (the tensor sends 2048 '
                                                  'values for 3072 pixel values)')


def test_the_prior_aware_bound_holds_for_the_best_attacker_of_a_gaussian_model():
    """x ~ N(0.5, v I), z = W x + N(0, sigma^2 I): the posterior mean is the best attacker there is; its MSE is at
    least the van Trees bound 1 / (E[dFIL] + J_P) with J_P = 1 / v, and equal to it where W^T W is a multiple of
    the identity."""
    torch.manual_seed(0)
    d, v = 48, 0.02
    orthogonal = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    spread = orthogonal @ torch.diag(torch.linspace(0.2, 2.0, d, dtype=torch.float64)) @ orthogonal.T
    for weight, tight in ((0.5 * orthogonal, True), (spread, False)):
        dfil = leakage(weight.pow(2).sum(), d, SIGMA ** 2)['dfil'].item()
        bound = Bound.__new__(Bound)
        bound.prior = {'sigma': 0.1, 'per_pixel': 1 / v, 'limit': 1 / v}
        promised = bound.prior_aware({'dfil': {'mean': dfil}})
        posterior = torch.linalg.inv(weight.T @ weight / SIGMA ** 2 + torch.eye(d, dtype=torch.float64) / v)
        mmse = posterior.trace().item() / d  # the posterior mean's expected per-pixel MSE, exactly
        assert mmse >= promised['mse'] * (1 - 1e-9)
        assert promised['psnr'] == pytest.approx(DB * math.log(dfil + 1 / v))
        if tight:
            assert mmse == pytest.approx(promised['mse'], rel=1e-9)
        else:
            assert mmse > promised['mse'] * 1.05


def test_the_priors_fisher_information_is_larger_for_photos_than_for_noise(tmp_path):
    """Denoising score matching: photos are predictable from their noisy versions, independent uniform pixels are
    not, so the photos' prior carries more Fisher information; both within [0, 1 / sigma^2]."""
    photos = load_splits(tiny_config(tmp_path).data)
    noise = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    found = {name: prior_fisher(images, 0.1, 0, CPU, steps=150)
             for name, images in (('photos', photos.images[photos.train_idx]), ('noise', noise))}
    for record in found.values():
        assert 0 <= record['per_pixel'] <= record['limit'] == pytest.approx(100)
    assert found['photos']['per_pixel'] > 2 * found['noise']['per_pixel']


def counting(counts, key, function, images_at):
    """`function`, adding the number of images of each call (its argument at `images_at`) to counts[key]."""
    def counted(*args, **kwargs):
        counts[key] += len(args[images_at])
        return function(*args, **kwargs)
    return counted


@pytest.fixture(scope='module')
def bounded(tmp_path_factory):
    """A run with noise for a 12 dB ceiling and the white-box refinement: its folder, and the number of images each
    Hutchinson estimate and each optimisation ran on."""
    folder, counts = tmp_path_factory.mktemp('bound'), {'estimated': 0, 'optimised': 0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fisher, 'hutchinson_trace', counting(counts, 'estimated', fisher.hutchinson_trace, 1))
        patch.setattr(attacks, 'invert_features', counting(counts, 'optimised', attacks.invert_features, 1))
        main_in(folder, '--train', '--image_size', '32', '--batch_size', '16', '--num_batches', '6', '--num_epochs',
                '1', '--decoder_depth', 'light', '--num_workers', '0', '--noise_for_bound', '12', '--fil_probes', '4',
                '--attack', 'decoder+optimize', '--attack_steps', '2', '--save_dir', 'run')
    return folder / 'run', counts


@pytest.fixture
def bounded_run(bounded):
    return bounded[0]


def test_each_image_is_bounded_and_optimised_once_a_run(bounded):
    """The decoder and its refinement are scored against one bound, estimated once per image (beside the
    calibration's), and the sample grid shows the refinement the evaluation scored instead of running it again."""
    run, counts = bounded
    ceilings = [[r['psnr_ceiling'] for r in csv.DictReader(open(run / f'eval{slug}_per_image.csv'))]
                for slug in ('', '_decoder_optimize')]
    assert ceilings[0] == ceilings[1]
    calibration = json.loads((run / 'eval.json').read_text())['config']['bound_calibration']['images']
    assert counts == {'estimated': calibration + len(ceilings[0]), 'optimised': len(ceilings[0])}


def test_a_run_with_noise_for_a_bound_reports_the_ceiling_beside_the_attack(bounded_run):
    result = json.loads((bounded_run / 'eval.json').read_text())
    config = result['config']
    calibration = config['bound_calibration']
    assert config['train_noise'] and config['test_noise'] and config['noise_at'] == 'features'
    assert config['noise_var'] == config['test_noise_var'] == pytest.approx(calibration['variance'])
    assert calibration['target_db'] == 12 and calibration['probes'] == 4
    assert result['bound']['unbiased'].startswith('the Fisher information is singular')  # 2048 values, 3072 pixels
    prior = result['bound']['prior_aware']
    assert prior['psnr'] <= prior['psnr_guaranteed'] == pytest.approx(
        DB * math.log(result['metrics']['dfil']['mean'] + 1 / 0.1 ** 2), abs=1e-6)
    ceiling = result['metrics']['psnr_ceiling']['mean']
    rows = list(csv.DictReader(open(bounded_run / 'eval_per_image.csv')))
    assert {'dfil', 'mse_bound', 'psnr_ceiling', 'psnr_ceiling_se'} <= set(rows[0])
    per_image = torch.tensor([float(r['psnr_ceiling']) for r in rows])
    assert per_image.mean().item() == pytest.approx(ceiling, rel=1e-4)


def test_a_deterministic_tensor_reports_no_bound(tmp_path, main_here):
    result = main_here(tmp_path, '--train', '--image_size', '32', '--batch_size', '16', '--num_batches', '4',
                       '--num_epochs', '1', '--decoder_depth', 'light', '--num_workers', '0', '--save_dir', 'run')
    assert NO_NOISE in result.stdout
    record = json.loads((tmp_path / 'run' / 'eval.json').read_text())
    assert record['bound'] == NO_NOISE
    assert 'psnr_ceiling' not in record['metrics']


def test_a_sweep_over_the_bound_sets_each_noise_from_its_ceiling(tmp_path):
    main_in(tmp_path, '--sweep', 'noise_for_bound', '--sweep_values', '10', '25', '--attack', 'decoder+optimize',
            '--attack_steps', '3', '--image_size', '32', '--batch_size', '16', '--num_batches', '4',
            '--num_epochs', '1', '--decoder_depth', 'light', '--num_workers', '0', '--fil_probes', '2',
            '--save_dir', 'sweep')
    rows = list(csv.DictReader(open(tmp_path / 'sweep' / 'sweep.csv')))
    low, high = (float(r['psnr_ceiling']) for r in rows)
    assert high - low == pytest.approx(15, abs=1e-3)  # the same images and probes: only sigma moved
    variances = [json.loads((tmp_path / 'sweep' / f'noise_for_bound={v}' / 'eval.json').read_text())['config']
                 ['test_noise_var'] for v in ('10', '25')]
    assert variances[0] / variances[1] == pytest.approx(10 ** 1.5, rel=1e-4)
    assert all('sigma' in r['noise_for_bound'] and r['decoder_psnr'] for r in rows)
    table = (tmp_path / 'sweep' / 'sweep.md').read_text()
    assert 'unbiased ceiling (dB, dFIL)' in table and 'the decoder alone, before the refinement' in table
    assert f'\n\nMade on: {provenance(CPU)["machine"]}; arithmetic ' in table
    assert (tmp_path / 'sweep' / 'sweep.png').is_file()


def test_a_calibrated_run_refuses_another_test_noise_when_evaluated(bounded, main_here):
    """Its noise is the calibrated one: another --test_noise_var would be ignored under the old label."""
    run, _ = bounded
    result = main_here(run.parent, '--eval', '--model_path', 'run/model.pth', '--test_noise_var', '0.3')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert ("--noise_for_bound sets the noise on the tensor itself (the run's own): drop --test_noise_var"
            in result.stderr)
