"""Kernel samples of a device profile by syscall and kind (copy, TCP, scheduling, allocation):
python3 perf-kernel-categories.py perf.data"""
import sys,subprocess,collections
f=sys.argv[1]
out=subprocess.run(['perf','script','-i',f,'-F','comm,ip,sym'],capture_output=True,text=True).stdout
N=0; c=collections.Counter()
groups=[('copy','_copy_to_iter','_copy_from_iter','copy_user','memcpy_orig','__memcpy','rep_movs','csum_partial_copy'),]
for blk in out.split('\n\n'):
    lines=[l.strip() for l in blk.strip().split('\n') if l.strip()]
    if not lines: continue
    N+=1
    syms=[l.split(None,1)[1] if len(l.split(None,1))>1 else '?' for l in lines[1:]]
    if not syms or not lines[1].startswith('ffffffff'): continue
    leaf=syms[0]
    # where: syscall
    where='other'
    for k,pat in [('sendmsg','__sys_sendmsg'),('sendto','__sys_sendto'),('recvmmsg','recvmmsg'),('tun_read','ksys_read'),('tun_write','ksys_write'),('poll','poll'),('futex','futex')]:
        if any(pat in s for s in syms): where=k; break
    if where=='other':
        if any('asm_sysvec' in s or 'asm_common' in s for s in syms): where='irq'
    # what
    what='other'
    if any(p in leaf for p in ('copy_to_iter','copy_from_iter','copy_user','memcpy','memmove','csum_partial')): what='copy'
    elif any(s.startswith('tcp_') or s.startswith('__tcp') for s in syms): what='tcp'
    elif any('schedule' in s or 'finish_task_switch' in s or 'try_to_wake_up' in s for s in syms): what='sched/wake'
    elif any(p in leaf for p in ('kmem_cache','kmalloc','kfree','skb_release','__alloc','page_frag','skb_free','free_unref','consume_skb','__slab','alloc_skb','build_skb','skb_attempt_defer')): what='alloc/free'
    c[(lines[0].split()[0],where,what)]+=1
tot=collections.Counter()
for (comm,w,wh),n in c.items(): tot[w+':'+wh]+=n
for k,n in sorted(tot.items(),key=lambda x:-x[1]): print(f"{k:22s} {100*n/N:5.1f}%")
print('kernel total', f"{100*sum(tot.values())/N:.1f}%")
