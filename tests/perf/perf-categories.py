"""Share of samples per thread and category (crypto, TSO split, syscalls, scheduling) in a
`perf record -e cpu-clock -g` of the devices: python3 perf-categories.py perf.data"""
import sys,subprocess,collections,re
f=sys.argv[1]
out=subprocess.run(['perf','script','-i',f,'-F','comm,tid,ip,sym,dso'],capture_output=True,text=True).stdout
samples=[]; cur=None
for line in out.split('\n'):
    if not line.strip():
        if cur: samples.append(cur); cur=None
        continue
    if not line.startswith((' ','\t')):
        cur=[line.split()[0],[]]
    else:
        parts=line.strip().split(None,1)
        if len(parts)>1 and cur: cur[1].append(parts[1])
if cur: samples.append(cur)
cats=collections.Counter(); tot=collections.Counter()
keys=[('crypto','chacha20_poly1305'),('segment','TcpSplit::segment'),('memmove','memmove'),
 ('sys_sendmsg','__sys_sendmsg'),('sys_sendto','__sys_sendto'),('sys_recvmmsg','recvmmsg'),
 ('sys_read(tun)','ksys_read'),('sys_write(tun)','ksys_write'),('sys_poll','poll'),('sys_futex','futex'),('sched','schedule'),
 ('irq','asm_sysvec'),('irq','asm_common_interrupt')]
for comm,stack in samples:
    tot[comm]+=1
    leaf=stack[0] if stack else ''
    c=None
    # kernel syscall: find outermost syscall frame
    for k,pat in keys[3:]:
        if any(pat in s for s in stack): c=k; break
    if c is None:
        for k,pat in keys[:3]:
            if pat in leaf: c=k; break
    if c is None:
        c='kernel-other' if '[kernel' in leaf else 'user-other'
    cats[(comm,c)]+=1
N=sum(tot.values())
for comm in sorted(tot):
    print(f"{comm}: {100*tot[comm]/N:.1f}%")
    for (cm,c),n in sorted(cats.items(),key=lambda x:-x[1]):
        if cm==comm: print(f"   {c:14s} {100*n/N:5.1f}%")
