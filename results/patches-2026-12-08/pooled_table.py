import json, sys
for f in sys.argv[1:]:
    d = json.load(open(f))
    p = d['pooled']
    print(f, 'pooled', round(p['mean_dice'], 3), [round(x, 3) for x in p['mean_dice_per_class']], 'steps', p['steps'], 'train', round(p['train_s']), 's')
    for k, v in d['local_only'].items():
        print('   ', k, round(v['mean_dice'], 3), [round(x, 3) for x in v['mean_dice_per_class']], {s: round(e['dice'], 2) for s, e in v['per_site'].items()})
